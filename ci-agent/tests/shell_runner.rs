//! The shell runner against real git repositories and real processes.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic

use std::sync::Arc;
use std::time::Duration;

use ci_agent::{Checkouts, ShellRunner};
use ci_core::protocol::BuildRequest;
use ci_core::{execute, Attempt, Completion, DispatchId, Job, LogSink, Outcome, RepoUrl, Runner, StepId};
use ci_testkit::{alive, wait_until, GitRepo};

struct Fixture {
    work: tempfile::TempDir,
    repo: GitRepo,
    runner: Arc<ShellRunner>,
}

fn fixture() -> Fixture {
    let work = tempfile::tempdir().unwrap();
    let repo = GitRepo::new();
    let checkouts = Checkouts::new(work.path()).unwrap();
    let runner = Arc::new(ShellRunner::new(
        checkouts,
        ci_core::model::DEFAULT_REPO_SCHEMES
            .iter()
            .map(|s| s.to_string())
            .collect(),
    ));
    Fixture { work, repo, runner }
}

impl Fixture {
    fn request(&self, build: i64, hash: &str, command: &str) -> BuildRequest {
        BuildRequest {
            secrets: Default::default(),
            id: DispatchId(build),
            step_id: Some(StepId(build)),
            command: command.into(),
            hash: hash.into(),
            repo: self.repo.url(),
            attempt: Some(Attempt(1)),
            image: None,
            timeout_ms: None,
            agent_id: None,
            build: None,
            step: None,
            services: Vec::new(),
        }
    }

    fn job(&self, build: i64, hash: &str, command: &str) -> Job {
        Job::from_request(
            &self.request(build, hash, command),
            ci_core::model::DEFAULT_REPO_SCHEMES,
        )
        .unwrap()
    }

    async fn run(&self, job: &Job) -> Completion {
        completed(execute(&*self.runner, job, &LogSink::default(), Duration::from_secs(60)).await)
    }

    fn workspaces(&self) -> usize {
        std::fs::read_dir(self.work.path().join("builds"))
            .unwrap()
            .count()
    }
}

fn completed(outcome: Outcome) -> Completion {
    match outcome {
        Outcome::Completed(c) => c,
        Outcome::HandBack(why) => panic!("handed back: {why}"),
    }
}

#[tokio::test]
async fn builds_the_exact_commit_and_reports_exit_code_and_output() {
    let f = fixture();
    let pass = f.repo.commit(
        &[
            ("build.sh", "echo building; cat version; exit 0\n"),
            ("version", "one\n"),
        ],
        "pass",
    );
    let fail = f.repo.commit(
        &[("build.sh", "echo broken >&2; exit 3\n"), ("version", "two\n")],
        "fail",
    );

    let c = f.run(&f.job(1, &pass, "sh build.sh")).await;
    assert_eq!(c.exit_code, 0, "{c:?}");
    assert!(c.stdout.contains("building\none\n"), "{}", c.stdout);

    let c = f.run(&f.job(2, &fail[..10], "sh build.sh")).await;
    assert_eq!(c.exit_code, 3);
    assert_eq!(c.stderr, "broken\n");

    let c = f
        .run(&f.job(3, "main", "echo $CI_COMMIT $CI_BUILD_ID $CI_BUILD_ATTEMPT $CI"))
        .await;
    assert!(c.stdout.ends_with(&format!("{fail} 3 1 true\n")), "{}", c.stdout);
    assert_eq!(f.workspaces(), 0, "workspaces are removed");
}

#[tokio::test]
async fn the_cache_fetches_new_commits_and_moved_refs() {
    let f = fixture();
    f.repo.commit(&[("v", "1")], "one");
    let c = f.run(&f.job(1, "main", "cat v")).await;
    assert!(c.stdout.ends_with('1'), "{c:?}");

    let two = f.repo.commit(&[("v", "2")], "two");
    let c = f.run(&f.job(2, "main", "cat v")).await;
    assert!(c.stdout.ends_with('2'), "a moved branch is fetched again: {c:?}");

    f.repo.git(&["checkout", "--quiet", "-b", "feature/x"]);
    let three = f.repo.commit(&[("v", "3")], "three");
    let c = f.run(&f.job(3, &three, "cat v")).await;
    assert!(c.stdout.ends_with('3'), "a new SHA is fetched: {c:?}");
    let c = f.run(&f.job(4, "feature/x", "git rev-parse HEAD")).await;
    assert!(c.stdout.ends_with(&format!("{three}\n")), "{c:?}");
    let c = f.run(&f.job(5, &two, "cat v")).await;
    assert!(c.stdout.ends_with('2'), "{c:?}");
}

#[tokio::test]
async fn a_remembered_commit_lost_from_the_cache_is_fetched_again() {
    let f = fixture();
    let sha = f.repo.commit(&[("v", "1")], "one");
    let c = f.run(&f.job(1, &sha, "cat v")).await;
    assert_eq!((c.exit_code, c.stdout.ends_with('1')), (0, true), "{c:?}");
    // The runner remembers the SHA; the cache it resolved in disappears.
    let repos = f.work.path().join("repos");
    std::fs::remove_dir_all(&repos).unwrap();
    std::fs::create_dir_all(&repos).unwrap();
    let c = f.run(&f.job(2, &sha, "cat v")).await;
    assert_eq!((c.exit_code, c.stdout.ends_with('1')), (0, true), "{c:?}");
    // An abbreviated SHA resolves to the full one in CI_COMMIT, both times.
    for build in [3, 4] {
        let c = f.run(&f.job(build, &sha[..10], "echo $CI_COMMIT")).await;
        assert!(c.stdout.ends_with(&format!("{sha}\n")), "{c:?}");
    }
    assert_eq!(f.workspaces(), 0);
}

#[tokio::test]
async fn the_workspace_is_a_git_checkout_with_branches_tags_and_origin() {
    let f = fixture();
    f.repo.commit(&[("a", "1")], "one");
    f.repo.git(&["tag", "-a", "v1.0", "-m", "release"]);
    let sha = f.repo.commit(&[("a", "2")], "two");
    let script = "git rev-parse HEAD; git describe --tags; git branch -r; git remote get-url origin; git status --short | wc -l";
    let c = f.run(&f.job(1, &sha, script)).await;
    assert_eq!(c.exit_code, 0, "{c:?}");
    let lines: Vec<&str> = c.stdout.lines().skip(1).collect();
    assert_eq!(lines[0], sha);
    assert!(lines[1].starts_with("v1.0-1-g"), "{c:?}");
    assert_eq!(lines[2].trim(), "origin/main");
    assert_eq!(lines[3], f.repo.url());
    assert_eq!(lines[4].trim(), "0", "a clean checkout");
    // A build that changes refs changes its workspace, not the cache.
    let c = f.run(&f.job(2, &sha, "git tag built && git tag")).await;
    assert!(c.stdout.contains("built"));
    let c = f.run(&f.job(3, &sha, "git tag")).await;
    assert!(!c.stdout.contains("built"), "{c:?}");
}

#[tokio::test]
async fn unknown_commits_and_bad_repos_fail_with_a_clear_message() {
    let f = fixture();
    f.repo.commit(&[("a", "a")], "a");
    let c = f.run(&f.job(1, "deadbeef", "true")).await;
    assert_eq!(c.exit_code, ci_core::Completion::NOT_RUN);
    assert!(c.stderr.contains("deadbeef not found"), "{}", c.stderr);

    let c = f.run(&f.job(2, "no-such-branch", "true")).await;
    assert!(c.stderr.contains("not found"), "{}", c.stderr);

    let mut job = f.job(3, "main", "true");
    job.repo = RepoUrl::parse("/nonexistent/repo").unwrap();
    let c = f.run(&job).await;
    assert!(c.stderr.contains("git could not clone"), "{}", c.stderr);

    // A ref that git would read as an option never becomes a job.
    let bad = Job::from_request(
        &f.request(4, "--upload-pack=touch /tmp/x", "true"),
        ci_core::model::DEFAULT_REPO_SCHEMES,
    );
    let e = bad.unwrap_err().to_string();
    assert!(e.contains("invalid hash"), "{e}");
    assert_eq!(f.workspaces(), 0);
}

#[tokio::test]
async fn background_processes_do_not_outlive_the_build() {
    let f = fixture();
    f.repo.commit(&[("a", "a")], "a");
    let pidfile = f.work.path().join("bg.pid");
    let cmd = format!("sleep 60 & echo $! > {}; echo started", pidfile.display());
    let c = tokio::time::timeout(Duration::from_secs(20), f.run(&f.job(1, "main", &cmd)))
        .await
        .expect("a background process must not hold the build open");
    assert_eq!(c.exit_code, 0, "{c:?}");
    let pid: i32 = std::fs::read_to_string(&pidfile).unwrap().trim().parse().unwrap();
    wait_until(
        "the background process to be killed",
        Duration::from_secs(5),
        || async { (!alive(pid)).then_some(()) },
    )
    .await;
}

#[tokio::test]
async fn dropping_a_build_kills_its_process_group() {
    let f = fixture();
    f.repo.commit(&[("a", "a")], "a");
    let pidfile = f.work.path().join("child.pid");
    let cmd = format!("sleep 300 & echo $! > {}; wait", pidfile.display());
    let job = f.job(1, "main", &cmd);
    let runner = f.runner.clone();
    let task = tokio::spawn(async move { runner.run(&job, &LogSink::default()).await });
    let pid: i32 = wait_until(
        "the build to start its child",
        Duration::from_secs(20),
        || async { std::fs::read_to_string(&pidfile).ok()?.trim().parse().ok() },
    )
    .await;
    assert!(alive(pid));
    task.abort();
    let _ = task.await;
    wait_until(
        "the abandoned build's processes to die",
        Duration::from_secs(5),
        || async { (!alive(pid)).then_some(()) },
    )
    .await;
    wait_until("the workspace to be removed", Duration::from_secs(5), || async {
        (f.workspaces() == 0).then_some(())
    })
    .await;
}

#[tokio::test]
async fn timeouts_and_signals() {
    let f = fixture();
    f.repo.commit(&[("a", "a")], "a");
    let mut job = f.job(1, "main", "echo before; sleep 30");
    job.timeout = Some(Duration::from_millis(1500));
    let c = f.run(&job).await;
    assert_eq!(c.exit_code, ci_core::runner::TIMED_OUT);
    assert!(c.stdout.contains("before"), "{c:?}");
    assert!(c.stderr.contains("timed out after 1s 500ms"), "{}", c.stderr);

    let c = f.run(&f.job(2, "main", "kill -TERM $$")).await;
    assert_eq!(c.exit_code, 128 + 15);
}

#[tokio::test]
async fn output_is_capped_with_a_marker() {
    let f = fixture();
    f.repo.commit(&[("a", "a")], "a");
    let job = f.job(1, "main", "head -c 3000000 /dev/zero | tr '\\0' x");
    let log = LogSink::new(1_000_000);
    let c = completed(execute(&*f.runner, &job, &log, Duration::from_secs(60)).await);
    assert_eq!(c.exit_code, 0);
    assert!(c.stdout.len() < 1_000_100, "{}", c.stdout.len());
    assert!(
        c.stdout.ends_with("bytes omitted]\n"),
        "{}",
        &c.stdout[c.stdout.len() - 80..]
    );
}
