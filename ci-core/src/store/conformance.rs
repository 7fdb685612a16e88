//! Conformance tests that any [`Store`] must pass. `ci-store` runs them
//! against SQLite. Enabled by the `test-support` feature.

#![allow(clippy::unwrap_used, missing_docs)]

use super::*;
use crate::model::{limits, CommitRef, NewStep, RepoUrl, StepStatus};

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

/// Puts a step whose agent was lost back in the queue; whether it did.
async fn requeued<S: Store>(s: &S, id: StepId, attempt: Attempt) -> bool {
    ok(s.requeue(id, attempt, Requeue::Lost, Timestamp(0)).await).is_some()
}

/// Creates a build of one step; returns both ids.
async fn create<S: Store>(s: &S, new: &NewBuild, now: Timestamp) -> (BuildId, StepId) {
    let b = ok(s.create_build(new, now).await);
    assert_eq!(b.steps.len(), 1);
    (b.id, b.steps[0].id)
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
    pipelines_follow_their_graph(&make().await).await;
    allowed_failures_and_retries(&make().await).await;
    canceling_and_retrying_a_pipeline(&make().await).await;
    a_broken_pipeline_fails_at_once(&make().await).await;
    the_queue_by_label_set(&make().await).await;
    retries_spent_by_their_causes(&make().await).await;
    services_are_kept(&make().await).await;
    projects_number_their_builds(&make().await).await;
    projects_keep_secrets_and_heads(&make().await).await;
    credentials_are_found_by_digest_and_revoked(&make().await).await;
}

/// Agents' credentials: found by their token's digest, each with its own
/// id; revoked once (the first time stays); an unknown one is none.
pub async fn credentials_are_found_by_digest_and_revoked<S: Store>(s: &S) {
    let a = ok(s.issue_credential("agent-a", &[1; 32], Timestamp(1)).await);
    let b = ok(s.issue_credential("agent-b", &[2; 32], Timestamp(2)).await);
    assert_ne!(a.id, b.id);
    assert_eq!(
        (a.name.as_str(), a.created_at, a.revoked_at),
        ("agent-a", Timestamp(1), None)
    );
    assert_eq!(ok(s.credential(&[1; 32]).await), Some(a.clone()));
    assert_eq!(ok(s.credential(&[3; 32]).await), None);
    assert!(ok(s.revoke_credential(a.id, Timestamp(5)).await));
    assert!(ok(s.revoke_credential(a.id, Timestamp(6)).await));
    assert!(!ok(s.revoke_credential(999, Timestamp(6)).await));
    assert_eq!(
        ok(s.credential(&[1; 32]).await).and_then(|c| c.revoked_at),
        Some(Timestamp(5))
    );
    assert_eq!(ok(s.credential(&[2; 32]).await).and_then(|c| c.revoked_at), None);
}

fn in_project(project: &str, branch: &str) -> NewBuild {
    let mut b = new_build("make");
    b.branch = Some(branch.to_owned());
    b.source.project = project.to_owned();
    b
}

/// Each project numbers its builds from 1, the default project always
/// exists, a project that does not is refused, listings filter, a webhook
/// delivery makes one build, and a project goes with its builds, only
/// when they are all finished.
pub async fn projects_number_their_builds<S: Store>(s: &S) {
    use crate::project::{Project, Source};
    assert!(ok(s.project(Project::DEFAULT).await).is_some());
    let web = ok(s
        .create_project(&Project::new("web", "/srv/web"), Timestamp(5))
        .await);
    assert_eq!(web.created_at, Timestamp(5));
    assert!(matches!(
        s.create_project(&Project::new("web", "/x"), Timestamp(6)).await,
        Err(crate::Error::Conflict(_))
    ));
    let a = ok(s.create_build(&in_project("web", "main"), Timestamp(7)).await);
    let b = ok(s.create_build(&new_build("make"), Timestamp(7)).await);
    let c = ok(s.create_build(&in_project("web", "dev"), Timestamp(7)).await);
    assert_eq!((a.number, b.number, c.number), (1, 1, 2));
    assert_eq!(b.source.project, Project::DEFAULT);
    assert!(matches!(
        s.create_build(&in_project("nope", "main"), Timestamp(7)).await,
        Err(crate::Error::ProjectNotFound(_))
    ));
    let by_number = ok(s.build_by_number("web", 2).await).unwrap();
    assert_eq!(by_number.id, c.id);
    assert_eq!(by_number.branch.as_deref(), Some("dev"));

    let filter = |project: Option<&str>, branch: Option<&str>, status: Vec<BuildStatus>| BuildFilter {
        project: project.map(str::to_owned),
        branch: branch.map(str::to_owned),
        status,
    };
    let ids = |v: Vec<Build>| v.into_iter().map(|b| b.id).collect::<Vec<_>>();
    let page = Page::default();
    assert_eq!(
        ids(ok(s.find_builds(&filter(Some("web"), None, vec![]), page).await)),
        [c.id, a.id]
    );
    assert_eq!(
        ids(ok(s
            .find_builds(&filter(Some("web"), Some("main"), vec![]), page)
            .await)),
        [a.id]
    );
    assert_eq!(
        ids(ok(s.find_builds(&filter(None, None, vec![]), page).await)),
        [c.id, b.id, a.id]
    );
    assert!(ok(s
        .find_builds(&filter(None, None, vec![BuildStatus::Success]), page)
        .await)
    .is_empty());
    let some = filter(None, Some("main"), vec![BuildStatus::Queued, BuildStatus::Failed]);
    assert_eq!(ids(ok(s.find_builds(&some, page).await)), [a.id]);
    let one = Page {
        limit: 1,
        offset: 1,
        before: None,
    };
    assert_eq!(
        ids(ok(s.find_builds(&filter(Some("web"), None, vec![]), one).await)),
        [a.id]
    );

    // Where it came from is kept.
    let mut pushed = in_project("web", "main");
    pushed.source = Source {
        project: "web".into(),
        event: Some(crate::pipeline::Trigger::Push),
        subject: Some("Fix the thing".into()),
        author: Some("Ada <ada@example.com>".into()),
        untrusted: true,
        delivery: Some("github:1234".into()),
    };
    let d = ok(s.create_build(&pushed, Timestamp(8)).await);
    assert_eq!(ok(s.build(d.id).await).unwrap().source, pushed.source);
    assert!(matches!(
        s.create_build(&pushed, Timestamp(9)).await,
        Err(crate::Error::Conflict(_))
    ));
    assert_eq!(
        ok(s.build_by_number("web", 4).await),
        None,
        "a refused build takes no number"
    );

    // Settings are replaced; the default project too, keeping its numbers.
    // (Read first: a store that keeps what it read must forget it.)
    assert_eq!(
        ok(s.project("web").await).map(|p| p.repo),
        Some("/srv/web".to_owned())
    );
    let mut changed = Project::new("web", "/srv/web2");
    changed.poll_interval_s = 0;
    changed.branches = vec!["main".into()];
    changed.cancel_previous = true;
    changed.forge = Some(crate::project::Forge {
        kind: crate::project::ForgeKind::Gitea,
        url: "http://127.0.0.1:3000".into(),
        repo: "acme/web".into(),
    });
    let stored = ok(s.update_project(&changed).await);
    assert_eq!(
        stored,
        Project {
            created_at: Timestamp(5),
            ..changed.clone()
        }
    );
    assert_eq!(ok(s.project("web").await), Some(stored));
    ok(s.update_project(&Project::new(Project::DEFAULT, "/srv/main"))
        .await);
    assert_eq!(
        ok(s.create_build(&new_build("make"), Timestamp(9)).await).number,
        2
    );
    let names: Vec<String> = ok(s.projects().await).into_iter().map(|p| p.name).collect();
    assert_eq!(names, [Project::DEFAULT, "web"]);
    assert!(matches!(
        s.update_project(&Project::new("nope", "/x")).await,
        Err(crate::Error::ProjectNotFound(_))
    ));

    // Deleting: refused while a build runs, and for the default project.
    assert!(matches!(
        s.delete_project("web").await,
        Err(crate::Error::Conflict(_))
    ));
    assert!(matches!(
        s.delete_project(Project::DEFAULT).await,
        Err(crate::Error::Conflict(_))
    ));
    for id in [a.id, c.id, d.id] {
        ok(s.cancel(id, Timestamp(10)).await);
    }
    assert!(ok(s.delete_project("web").await));
    assert!(!ok(s.delete_project("web").await));
    assert_eq!(ok(s.project("web").await), None);
    assert_eq!(ok(s.build(a.id).await), None);
    assert!(ok(s.build(b.id).await).is_some());
    // A project made again under the name starts again from 1.
    ok(s.create_project(&Project::new("web", "/srv/web"), Timestamp(11))
        .await);
    assert_eq!(
        ok(s.create_build(&in_project("web", "main"), Timestamp(12)).await).number,
        1
    );
}

/// Secrets are kept sealed as given, listed by name, replaced and
/// deleted; heads are replaced as a whole; both go with their project.
pub async fn projects_keep_secrets_and_heads<S: Store>(s: &S) {
    use crate::project::Project;
    ok(s.create_project(&Project::new("web", "/srv/web"), Timestamp(1))
        .await);
    ok(s.put_secret("web", "TOKEN", b"sealed-1", Timestamp(2)).await);
    ok(s.put_secret("web", "A", b"sealed-2", Timestamp(3)).await);
    ok(s.put_secret("web", "TOKEN", b"sealed-3", Timestamp(4)).await);
    ok(s.put_secret(Project::DEFAULT, "TOKEN", b"other", Timestamp(4))
        .await);
    assert!(matches!(
        s.put_secret("nope", "A", b"x", Timestamp(4)).await,
        Err(crate::Error::ProjectNotFound(_))
    ));
    assert_eq!(
        ok(s.secret_names("web").await),
        [("A".to_owned(), Timestamp(3)), ("TOKEN".to_owned(), Timestamp(4))]
    );
    let wanted = ["TOKEN".to_owned(), "MISSING".to_owned()];
    assert_eq!(
        ok(s.secrets("web", &wanted).await),
        [("TOKEN".to_owned(), b"sealed-3".to_vec())]
    );
    assert!(ok(s.delete_secret("web", "A").await));
    assert!(!ok(s.delete_secret("web", "A").await));

    assert!(ok(s.heads("web").await).is_empty());
    let heads = [
        ("main".to_owned(), "a".repeat(40)),
        ("dev".to_owned(), "b".repeat(40)),
    ];
    ok(s.set_heads("web", &heads).await);
    let mut got = ok(s.heads("web").await);
    got.sort();
    let mut want = heads.to_vec();
    want.sort();
    assert_eq!(got, want);
    ok(s.set_heads("web", &heads[..1]).await);
    assert_eq!(ok(s.heads("web").await), heads[..1]);

    assert!(ok(s.delete_project("web").await));
    ok(s.create_project(&Project::new("web", "/srv/web"), Timestamp(5))
        .await);
    assert!(ok(s.secret_names("web").await).is_empty());
    assert!(ok(s.heads("web").await).is_empty());
    assert_eq!(ok(s.secret_names(Project::DEFAULT).await).len(), 1);
}

/// Retries are spent only by the causes a step lists: a step that counts
/// lost agents spends one per loss and fails, with its streamed log and a
/// line saying why, when none is left (the build moving on as with any
/// failure); a step that does not count them runs again however often its
/// agent is lost, and one asked for a rerun by its agent never spends one;
/// a step retried on timeouts only ends on another failure.
pub async fn retries_spent_by_their_causes<S: Store>(s: &S) {
    use crate::model::RetryOn;
    use StepStatus::*;
    let agent = ok(s.register_agent(&enroll("http://a:1", None), Timestamp(0)).await);
    let only = |failure, timeout, agent_lost| RetryOn {
        failure,
        timeout,
        agent_lost,
    };
    let b = ok(s
        .create_build(
            &diamond(|n| {
                (n.retries, n.retry_on) = match n.name.as_str() {
                    "a" => (1, only(false, false, true)),
                    "b" => (0, only(true, true, false)),
                    "c" => (1, only(false, true, false)),
                    _ => (0, RetryOn::default()),
                };
            }),
            Timestamp(0),
        )
        .await);
    let ids: Vec<StepId> = b.steps.iter().map(|s| s.id).collect();
    let lost = |id, attempt| s.requeue(id, Attempt(attempt), Requeue::Lost, Timestamp(9));
    let returned = |id, attempt| s.requeue(id, Attempt(attempt), Requeue::Returned, Timestamp(9));

    // a: handed back (free), lost once (its one retry), lost again: fails.
    ok(start_one(s, ids[0], &agent, Timestamp(1)).await);
    let moved = ok(returned(ids[0], 1).await).unwrap_or_else(|| panic!("not requeued"));
    assert_eq!(moved.steps, [(ids[0], Queued)]);
    ok(start_one(s, ids[0], &agent, Timestamp(2)).await);
    assert!(ok(lost(ids[0], 2).await).is_some());
    assert_eq!(
        ok(s.step(ids[0]).await).map(|s| (s.status, s.retries_left)),
        Some((Queued, 0))
    );
    ok(start_one(s, ids[0], &agent, Timestamp(3)).await);
    let half = LogPiece {
        seq: 0,
        stream: Stream::Stdout,
        data: "half".into(),
    };
    ok(s.append_log(ids[0], Attempt(3), &[half]).await);
    let moved = ok(lost(ids[0], 3).await).unwrap_or_else(|| panic!("not moved"));
    assert!(moved.steps.contains(&(ids[0], Failed)), "{moved:?}");
    assert!(moved.ended(), "{moved:?}");
    assert_eq!(
        statuses(s, b.id).await,
        (BuildStatus::Failed, vec![Failed, Skipped, Skipped, Skipped])
    );
    let a = ok(s.step(ids[0]).await).unwrap_or_else(|| panic!("gone"));
    assert_eq!(
        (a.exit_code, a.finished_at),
        (Some(Completion::NOT_RUN), Some(Timestamp(9)))
    );
    let log = ok(s.log(ids[0], None).await).unwrap_or_default();
    assert!(log.complete, "{log:?}");
    assert_eq!(
        (log.stdout.as_str(), log.stderr.as_str()),
        ("half", Requeue::LOST_LINE)
    );
    assert!(ok(s.leases().await).is_empty());
    assert!(
        ok(s.finish(ids[0], Attempt(3), &exit(0), Timestamp(10)).await).is_none(),
        "the lost attempt's late result does not win"
    );
    assert!(ok(lost(ids[0], 3).await).is_none(), "fenced");

    // Without agent_lost, losses never spend a retry nor fail the step;
    // timeouts-only retries end on any other failure.
    let b = ok(s
        .create_build(
            &diamond(|n| {
                (n.retries, n.retry_on) = match n.name.as_str() {
                    "a" => (1, only(true, true, false)),
                    "c" => (1, only(false, true, false)),
                    _ => (0, RetryOn::default()),
                };
            }),
            Timestamp(20),
        )
        .await);
    let ids: Vec<StepId> = b.steps.iter().map(|s| s.id).collect();
    for attempt in 1..=4 {
        ok(start_one(s, ids[0], &agent, Timestamp(21)).await);
        assert!(ok(lost(ids[0], attempt).await).is_some());
    }
    assert_eq!(
        ok(s.step(ids[0]).await).map(|s| (s.status, s.retries_left)),
        Some((Queued, 1))
    );
    ok(start_one(s, ids[0], &agent, Timestamp(22)).await);
    assert!(ok(s.finish(ids[0], Attempt(5), &exit(0), Timestamp(23)).await).is_some());
    ok(start_one(s, ids[2], &agent, Timestamp(24)).await);
    assert!(ok(s
        .finish(ids[2], Attempt(1), &exit(crate::runner::TIMED_OUT), Timestamp(25))
        .await)
    .is_some());
    assert_eq!(
        ok(s.step(ids[2]).await).map(|s| s.status),
        Some(Queued),
        "timed out: runs again"
    );
    assert!(ok(start_one(s, ids[1], &agent, Timestamp(26)).await).is_some());
    assert!(ok(s.finish(ids[1], Attempt(1), &exit(0), Timestamp(27)).await).is_some());
    let c = ok(start_one(s, ids[2], &agent, Timestamp(28)).await);
    assert_eq!(c.map(|c| c.attempt), Some(Attempt(2)));
    ok(s.finish(ids[2], Attempt(2), &exit(1), Timestamp(29)).await);
    assert_eq!(
        statuses(s, b.id).await,
        (BuildStatus::Failed, vec![Success, Success, Failed, Skipped]),
        "c retries only timeouts; it had one left, but failed otherwise"
    );
}

/// A step's services are stored and read back as given.
pub async fn services_are_kept<S: Store>(s: &S) {
    let service = crate::model::Service {
        name: "db".into(),
        image: crate::model::ImageRef::parse("postgres:15").unwrap_or_else(|e| panic!("{e}")),
        env: [("POSTGRES_PASSWORD".to_owned(), "it's".to_owned())].into(),
        command: vec!["postgres".into(), "-c".into(), "fsync=off".into()],
    };
    let b = ok(s
        .create_build(
            &diamond(|n| {
                if n.name == "b" {
                    n.image = Some("debian:bookworm".into());
                    n.services = vec![service.clone()];
                }
            }),
            Timestamp(0),
        )
        .await);
    let read = ok(s.build(b.id).await).unwrap_or_else(|| panic!("gone"));
    assert_eq!(read.steps[1].services, std::slice::from_ref(&service));
    assert!(read.steps[0].services.is_empty());
    assert_eq!(
        ok(s.step(b.steps[1].id).await).map(|s| s.services),
        Some(vec![service])
    );
}

/// The queue by label set: the distinct sets queued steps ask for, and
/// the oldest steps of one set, however deep in the queue.
pub async fn the_queue_by_label_set<S: Store>(s: &S) {
    let set = |l: &[&str]| crate::model::Labels::parse(l).unwrap_or_else(|e| panic!("{e}"));
    let mut ids = Vec::new();
    for i in 0..200 {
        let new = NewBuild {
            labels: if i % 50 == 49 {
                set(&["gpu"])
            } else {
                set(&["os=a"])
            },
            ..new_build("x")
        };
        ids.push(create(s, &new, Timestamp(i)).await.1);
    }
    let mut sets = ok(s.queued_label_sets().await);
    sets.sort();
    assert_eq!(sets, [set(&["gpu"]), set(&["os=a"])]);
    let gpu: Vec<StepId> = ok(s.queued_with(&set(&["gpu"]), 3).await)
        .iter()
        .map(|st| st.id)
        .collect();
    assert_eq!(
        gpu,
        [ids[49], ids[99], ids[149]],
        "oldest first, from deep in the queue"
    );
    assert!(ok(s.queued_with(&set(&["nope"]), 3).await).is_empty());
    let agent = ok(s.register_agent(&enroll("http://a:1", None), Timestamp(0)).await);
    ok(start_one(s, ids[49], &agent, Timestamp(300)).await);
    let gpu: Vec<StepId> = ok(s.queued_with(&set(&["gpu"]), 10).await)
        .iter()
        .map(|st| st.id)
        .collect();
    assert_eq!(gpu, [ids[99], ids[149], ids[199]], "a started step leaves it");
}

/// A build whose pipeline cannot be read is stored failed, with one step
/// named after the file whose log says why; nothing is queued.
pub async fn a_broken_pipeline_fails_at_once<S: Store>(s: &S) {
    let new = NewBuild {
        failure: Some(".ci.yml:3:5: unknown field `stpes`".into()),
        ..new_build(".ci.yml")
    };
    let b = ok(s.create_build(&new, Timestamp(7)).await);
    assert_eq!(
        (b.status, b.exit_code),
        (BuildStatus::Failed, Some(Completion::NOT_RUN))
    );
    assert_eq!(b.finished_at, Some(Timestamp(7)));
    assert_eq!(b.steps.len(), 1);
    assert_eq!(
        (b.steps[0].name.as_str(), b.steps[0].status),
        (".ci.yml", StepStatus::Failed)
    );
    assert_eq!(ok(s.queued(10).await), vec![]);
    let log = ok(s.log(b.steps[0].id, None).await).unwrap_or_default();
    assert!(
        log.complete && log.stderr.contains("unknown field `stpes`"),
        "{log:?}"
    );
    assert_eq!(ok(s.build(b.id).await), Some(b));
}

/// A diamond, `a` then `b` and `c`, then `d`, with `branch` put on step
/// `name` if given.
fn diamond(tweak: impl Fn(&mut NewStep)) -> NewBuild {
    let step = |name: &str, deps: &[&str]| {
        let mut n = NewStep {
            name: name.into(),
            command: format!("make {name}"),
            depends_on: deps.iter().map(|d| (*d).to_owned()).collect(),
            ..NewStep::default()
        };
        tweak(&mut n);
        n
    };
    NewBuild {
        steps: vec![
            step("a", &[]),
            step("b", &["a"]),
            step("c", &["a"]),
            step("d", &["b", "c"]),
        ],
        ..new_build("pipeline")
    }
}

fn exit(code: i32) -> Completion {
    Completion {
        exit_code: code,
        stdout: format!("exit {code}"),
        stderr: String::new(),
    }
}

async fn statuses<S: Store>(s: &S, id: BuildId) -> (BuildStatus, Vec<StepStatus>) {
    let b = ok(s.build(id).await).unwrap_or_else(|| panic!("build {id} vanished"));
    (b.status, b.steps.iter().map(|s| s.status).collect())
}

/// A step is queued only once every step it depends on has passed; a
/// failed step skips what depends on it, at once, and the build ends with
/// its last step.
pub async fn pipelines_follow_their_graph<S: Store>(s: &S) {
    use StepStatus::*;
    let agent = ok(s.register_agent(&enroll("http://a:1", None), Timestamp(0)).await);
    let b = ok(s.create_build(&diamond(|_| {}), Timestamp(0)).await);
    let ids: Vec<StepId> = b.steps.iter().map(|s| s.id).collect();
    let names: Vec<&str> = b.steps.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["a", "b", "c", "d"]);
    assert_eq!(b.steps[3].depends_on, ["b", "c"]);
    assert_eq!(
        statuses(s, b.id).await,
        (BuildStatus::Queued, vec![Queued, Pending, Pending, Pending])
    );
    let queued: Vec<StepId> = ok(s.queued(10).await).iter().map(|s| s.id).collect();
    assert_eq!(queued, [ids[0]]);
    let started = ok(start_one(s, ids[0], &agent, Timestamp(1)).await).unwrap_or_else(|| panic!("a"));
    assert_eq!(
        (started.repo.as_str(), started.command.as_str()),
        ("/srv/repo", "make a")
    );
    assert!(ok(s.finish(ids[0], Attempt(1), &exit(0), Timestamp(2)).await).is_some());
    assert_eq!(
        statuses(s, b.id).await,
        (BuildStatus::Running, vec![Success, Queued, Queued, Pending])
    );
    ok(start_one(s, ids[1], &agent, Timestamp(3)).await);
    let moved = ok(s.finish(ids[1], Attempt(1), &exit(2), Timestamp(4)).await).unwrap_or_default();
    assert_eq!(moved.steps, [(ids[1], Failed), (ids[3], Skipped)], "what moved");
    assert!(!moved.ended());
    assert_eq!(
        statuses(s, b.id).await,
        (BuildStatus::Running, vec![Success, Failed, Queued, Skipped]),
        "d is skipped as soon as b fails; c still runs"
    );
    ok(start_one(s, ids[2], &agent, Timestamp(5)).await);
    assert!(ok(s.finish(ids[2], Attempt(1), &exit(0), Timestamp(6)).await).is_some());
    let done = ok(s.build(b.id).await).unwrap_or_else(|| panic!("gone"));
    assert_eq!(done.status, BuildStatus::Failed);
    assert_eq!(
        done.exit_code,
        Some(2),
        "the exit code of the step that failed it"
    );
    assert_eq!(
        (done.started_at, done.finished_at),
        (Some(Timestamp(1)), Some(Timestamp(6)))
    );
    assert_eq!(ok(s.queued(10).await), vec![]);
    assert_eq!(
        ok(s.log(ids[1], None).await).map(|l| l.stdout),
        Some("exit 2".into())
    );
    let counts = ok(s.status_counts().await);
    assert!(counts.contains(&(BuildStatus::Failed, 1)), "{counts:?}");
}

/// A step that may fail does not fail the build nor skip its dependents;
/// a failed attempt with retries left queues its step again, with its log
/// kept.
pub async fn allowed_failures_and_retries<S: Store>(s: &S) {
    use StepStatus::*;
    let agent = ok(s.register_agent(&enroll("http://a:1", None), Timestamp(0)).await);
    let b = ok(s
        .create_build(
            &diamond(|n| {
                n.allow_failure = n.name == "b";
                n.retries = u32::from(n.name == "c");
            }),
            Timestamp(0),
        )
        .await);
    let ids: Vec<StepId> = b.steps.iter().map(|s| s.id).collect();
    ok(start_one(s, ids[0], &agent, Timestamp(1)).await);
    assert!(ok(s.finish(ids[0], Attempt(1), &exit(0), Timestamp(2)).await).is_some());
    ok(start_one(s, ids[1], &agent, Timestamp(3)).await);
    assert!(ok(s.finish(ids[1], Attempt(1), &exit(1), Timestamp(4)).await).is_some());
    ok(start_one(s, ids[2], &agent, Timestamp(3)).await);
    assert!(ok(s.finish(ids[2], Attempt(1), &exit(7), Timestamp(4)).await).is_some());
    assert_eq!(
        statuses(s, b.id).await,
        (BuildStatus::Running, vec![Success, Failed, Queued, Pending]),
        "c runs again"
    );
    assert!(
        ok(s.finish(ids[2], Attempt(1), &exit(7), Timestamp(4)).await).is_none(),
        "its result was taken"
    );
    let again = ok(start_one(s, ids[2], &agent, Timestamp(5)).await).map(|s| s.attempt);
    assert_eq!(again, Some(Attempt(2)));
    assert!(ok(s.finish(ids[2], Attempt(2), &exit(0), Timestamp(6)).await).is_some());
    assert_eq!(
        ok(s.log(ids[2], Some(Attempt(1))).await).map(|l| l.stdout),
        Some("exit 7".into())
    );
    assert_eq!(
        statuses(s, b.id).await,
        (BuildStatus::Running, vec![Success, Failed, Success, Queued]),
        "b may fail: d runs"
    );
    ok(start_one(s, ids[3], &agent, Timestamp(7)).await);
    assert!(ok(s.finish(ids[3], Attempt(1), &exit(0), Timestamp(8)).await).is_some());
    let done = ok(s.build(b.id).await).unwrap_or_else(|| panic!("gone"));
    assert_eq!((done.status, done.exit_code), (BuildStatus::Success, Some(0)));
}

/// Cancel ends every step of a pipeline; retry runs the steps that did
/// not pass again and keeps the rest.
pub async fn canceling_and_retrying_a_pipeline<S: Store>(s: &S) {
    use StepStatus::*;
    let agent = ok(s.register_agent(&enroll("http://a:1", None), Timestamp(0)).await);
    let b = ok(s.create_build(&diamond(|_| {}), Timestamp(0)).await);
    let ids: Vec<StepId> = b.steps.iter().map(|s| s.id).collect();
    assert_eq!(ok(s.retry(b.id, Timestamp(1)).await), None, "not finished");
    ok(start_one(s, ids[0], &agent, Timestamp(1)).await);
    assert!(ok(s.finish(ids[0], Attempt(1), &exit(0), Timestamp(2)).await).is_some());
    ok(start_one(s, ids[1], &agent, Timestamp(3)).await);
    let (stopped, moved) = ok(s.cancel(b.id, Timestamp(4)).await).unwrap_or_default();
    assert_eq!(
        moved.steps,
        [(ids[1], Canceled), (ids[2], Canceled), (ids[3], Canceled)],
        "what moved"
    );
    assert!(moved.ended());
    assert_eq!(stopped.iter().map(|l| l.step).collect::<Vec<_>>(), [ids[1]]);
    assert_eq!(
        statuses(s, b.id).await,
        (BuildStatus::Canceled, vec![Success, Canceled, Canceled, Canceled])
    );
    assert_eq!(ok(s.leases().await), vec![]);

    let retried = ok(s.retry(b.id, Timestamp(5)).await).unwrap_or_else(|| panic!("retry"));
    assert_eq!(retried.after, Some(BuildStatus::Running));
    assert_eq!(
        statuses(s, b.id).await,
        (BuildStatus::Running, vec![Success, Queued, Queued, Pending])
    );
    let again = ok(start_one(s, ids[1], &agent, Timestamp(6)).await).map(|s| s.attempt);
    assert_eq!(again, Some(Attempt(2)), "a new attempt");
    assert!(ok(s.finish(ids[1], Attempt(2), &exit(0), Timestamp(7)).await).is_some());
    ok(start_one(s, ids[2], &agent, Timestamp(6)).await);
    assert!(ok(s.finish(ids[2], Attempt(1), &exit(0), Timestamp(7)).await).is_some());
    ok(start_one(s, ids[3], &agent, Timestamp(8)).await);
    assert!(ok(s.finish(ids[3], Attempt(1), &exit(0), Timestamp(9)).await).is_some());
    assert_eq!(statuses(s, b.id).await.0, BuildStatus::Success);
}

/// A log read a piece at a time is the log.
pub async fn logs_read_in_pieces<S: Store>(s: &S) {
    let agent = ok(s.register_agent(&enroll("http://a:1", None), Timestamp(0)).await);
    let (_, id) = create(s, &new_build("x"), Timestamp(0)).await;
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
    assert!(ok(s.finish(id, Attempt(1), &done, Timestamp(2)).await).is_some());
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
    let (_, id) = create(s, &new_build("x"), Timestamp(0)).await;
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

/// Cancel ends every unfinished step of a build, once, and names the
/// running attempts to stop.
pub async fn cancel_is_fenced<S: Store>(s: &S) {
    let agent = ok(s.register_agent(&enroll("http://a:1", None), Timestamp(0)).await);
    let (queued, _) = create(s, &new_build("q"), Timestamp(0)).await;
    assert_eq!(
        ok(s.cancel(queued, Timestamp(5)).await).map(|(stops, _)| stops),
        Some(vec![])
    );
    assert_eq!(
        ok(s.queued(10).await),
        vec![],
        "a canceled build leaves the queue"
    );
    let b = ok(s.build(queued).await).unwrap_or_else(|| panic!("gone"));
    assert_eq!(
        (b.status, b.finished_at, b.steps[0].status),
        (BuildStatus::Canceled, Some(Timestamp(5)), StepStatus::Canceled)
    );
    assert_eq!(ok(s.cancel(queued, Timestamp(6)).await), None, "once");
    assert_eq!(ok(s.cancel(BuildId(999), Timestamp(6)).await), None);

    let (running, step) = create(s, &new_build("r"), Timestamp(0)).await;
    ok(start_one(s, step, &agent, Timestamp(1)).await);
    let (stopped, _) = ok(s.cancel(running, Timestamp(2)).await).unwrap_or_default();
    assert_eq!(
        stopped
            .iter()
            .map(|l| (l.step, l.attempt, l.agent))
            .collect::<Vec<_>>(),
        vec![(step, Attempt(1), agent.id)]
    );
    let done = Completion {
        exit_code: 0,
        stdout: String::new(),
        stderr: String::new(),
    };
    assert!(
        ok(s.finish(step, Attempt(1), &done, Timestamp(3)).await).is_none(),
        "a canceled step takes no result"
    );
    assert_eq!(ok(s.leases().await), vec![]);
    let counts = ok(s.status_counts().await);
    assert!(counts.contains(&(BuildStatus::Canceled, 2)), "{counts:?}");
    assert!(counts.contains(&(BuildStatus::Running, 0)), "{counts:?}");
}

/// Live output: in seq order, repeats ignored, only for the running
/// attempt, replaced by the final log.
pub async fn live_logs_are_ordered_fenced_and_idempotent<S: Store>(s: &S) {
    let agent = ok(s.register_agent(&enroll("http://a:1", None), Timestamp(0)).await);
    let (_, id) = create(s, &new_build("x"), Timestamp(0)).await;
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
    assert!(requeued(s, id, Attempt(1)).await);
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
    assert!(ok(s.finish(id, Attempt(2), &done, Timestamp(3)).await).is_some());
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
    let started = ok(start_one(s, b.steps[0].id, &agent, Timestamp(3)).await).map(|b| b.labels);
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
        ids.push(create(s, &new_build(&format!("c{i}")), Timestamp(i)).await.1);
    }
    let q: Vec<_> = ok(s.queued(3).await).iter().map(|b| b.id).collect();
    assert_eq!(q, ids[..3]);
    let started = ok(start_one(s, ids[0], &agent, Timestamp(10)).await).map(|b| b.status);
    assert_eq!(started, Some(StepStatus::Running));
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
    let (build, id) = create(s, &new_build("x"), Timestamp(0)).await;
    let done = Completion {
        exit_code: 0,
        stdout: "out".into(),
        stderr: String::new(),
    };
    assert!(
        ok(s.finish(id, Attempt(0), &done, Timestamp(1)).await).is_none(),
        "never dispatched"
    );
    let b1 = ok(start_one(s, id, &agent, Timestamp(1)).await).map(|b| b.attempt);
    assert_eq!(b1, Some(Attempt(1)));
    assert!(!requeued(s, id, Attempt(2)).await);
    assert!(requeued(s, id, Attempt(1)).await);
    assert!(!requeued(s, id, Attempt(1)).await, "already queued");
    let b2 = ok(start_one(s, id, &agent, Timestamp(2)).await).map(|b| b.attempt);
    assert_eq!(b2, Some(Attempt(2)));
    assert!(
        ok(s.finish(id, Attempt(1), &done, Timestamp(3)).await).is_none(),
        "superseded"
    );
    assert!(ok(s.finish(id, Attempt(2), &done, Timestamp(3)).await).is_some());
    assert!(
        ok(s.finish(id, Attempt(2), &done, Timestamp(4)).await).is_none(),
        "finished once"
    );
    let b = ok(s.build(build).await).unwrap_or_else(|| panic!("build {build} vanished"));
    assert_eq!(b.status, BuildStatus::Success);
    assert_eq!(b.exit_code, Some(0));
    assert_eq!(b.finished_at, Some(Timestamp(3)));
    assert_eq!(b.started_at, Some(Timestamp(2)));
    assert_eq!(b.agent_url.as_deref(), Some("http://a:1"));
    assert!(
        !requeued(s, id, Attempt(2)).await,
        "finished builds stay finished"
    );
}

/// A late result of the only attempt is accepted while the build waits.
pub async fn logs_are_kept_per_attempt<S: Store>(s: &S) {
    let agent = ok(s.register_agent(&enroll("http://a:1", None), Timestamp(0)).await);
    let (build, id) = create(s, &new_build("x"), Timestamp(0)).await;
    ok(start_one(s, id, &agent, Timestamp(1)).await);
    assert!(requeued(s, id, Attempt(1)).await);
    let failed = Completion {
        exit_code: 3,
        stdout: "o".into(),
        stderr: "e".into(),
    };
    assert!(
        ok(s.finish(id, Attempt(1), &failed, Timestamp(2)).await).is_some(),
        "queued, not re-dispatched"
    );
    assert_eq!(ok(s.queued(10).await), vec![], "finished builds leave the queue");
    let log = ok(s.log(id, None).await).unwrap_or_default();
    assert_eq!(
        (log.attempt, log.stdout.as_str(), log.stderr.as_str()),
        (Attempt(1), "o", "e")
    );
    assert_eq!(ok(s.log(id, Some(Attempt(2))).await), None);
    let b = ok(s.build(build).await).map(|b| (b.status, b.exit_code));
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
async fn start_one<S: Store>(s: &S, id: StepId, agent: &AgentRecord, now: Timestamp) -> Result<Option<Step>> {
    let claim = Claim {
        step: id,
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
    let (_, id) = create(s, &new_build("x"), Timestamp(0)).await;
    assert!(matches!(
        s.renew(id, None, None, Timestamp(5)).await,
        Err(crate::Error::NotRunning { .. })
    ));
    assert!(matches!(
        s.renew(StepId(999), None, None, Timestamp(5)).await,
        Err(crate::Error::StepNotFound(_))
    ));
    ok(start_one(s, id, &a, Timestamp(100)).await);
    let leases = ok(s.leases().await);
    assert_eq!(
        leases,
        vec![Lease {
            step: id,
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
    assert!(requeued(s, id, Attempt(1)).await);
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
    assert!(ok(s.finish(id, Attempt(2), &done, Timestamp(6000)).await).is_some());
    assert_eq!(ok(s.leases().await), vec![]);
    assert_eq!(ok(s.next_deadline().await), None);
    assert!(matches!(
        s.renew(id, Some(Attempt(2)), None, Timestamp(7000)).await,
        Err(crate::Error::NotRunning { .. })
    ));
}

/// One start starts every claimed step that is still queued, each once,
/// and skips the rest.
pub async fn starting_is_one_step_and_skips_what_is_not_queued<S: Store>(s: &S) {
    let a = ok(s.register_agent(&enroll("http://a:1", None), Timestamp(0)).await);
    let b = ok(s.register_agent(&enroll("http://b:1", None), Timestamp(0)).await);
    let mut ids = Vec::new();
    for i in 0..3 {
        ids.push(create(s, &new_build(&format!("c{i}")), Timestamp(0)).await);
    }
    assert!(ok(s.cancel(ids[1].0, Timestamp(1)).await).is_some());
    let ids: Vec<StepId> = ids.into_iter().map(|(_, step)| step).collect();
    let claim = |step, agent: &AgentRecord| Claim {
        step,
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
    let got: Vec<(StepId, Option<AgentId>, Attempt)> =
        started.iter().map(|s| (s.id, s.agent_id, s.attempt)).collect();
    assert_eq!(
        got,
        vec![(ids[0], Some(a.id), Attempt(1)), (ids[2], Some(b.id), Attempt(1))],
        "the canceled step and the second claim of the first are skipped"
    );
    assert_eq!(ok(s.leases().await).len(), 2);
    assert_eq!(ok(s.start(&[], Timestamp(11)).await), vec![]);
}
