//! The cache against real repositories: a path, and a `git daemon` on
//! loopback.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic

use std::process::{Child, Command, Stdio};

use ci_core::{CommitRef, RepoUrl};
use ci_git::{Checkouts, Error};
use ci_testkit::GitRepo;

fn rev(s: &str) -> CommitRef {
    CommitRef::parse(s).unwrap()
}

#[tokio::test]
async fn refs_resolve_to_full_shas_and_files_are_read_at_a_commit() {
    let repo = GitRepo::new();
    let first = repo.commit(&[(".ci.yml", "version: 1\n")], "first");
    repo.git(&["tag", "v1"]);
    let second = repo.commit(&[(".ci.yml", "version: 2\n"), ("dir/f", "x")], "second");
    let url = RepoUrl::parse(&repo.url()).unwrap();
    let work = tempfile::tempdir().unwrap();
    let git = Checkouts::new(work.path()).unwrap();

    assert_eq!(git.resolve(&url, &rev("main")).await.unwrap(), second);
    assert!(git.is_branch(&url, &rev("main")).await);
    assert_eq!(git.resolve(&url, &rev("v1")).await.unwrap(), first);
    assert!(!git.is_branch(&url, &rev("v1")).await, "a tag is not a branch");
    assert_eq!(git.resolve(&url, &rev(&first[..8])).await.unwrap(), first);
    assert_eq!(git.resolve(&url, &rev(&second)).await.unwrap(), second);
    match git.resolve(&url, &rev("no-such-branch")).await {
        Err(Error::NotFound(m)) => assert!(m.contains("no-such-branch not found"), "{m}"),
        other => panic!("{other:?}"),
    }

    // A branch that moves is fetched again.
    let third = repo.commit(&[("g", "y")], "third");
    assert_eq!(git.resolve(&url, &rev("main")).await.unwrap(), third);

    let read = |sha: String, path: &'static str, cap: u64| {
        let (git, url) = (git.clone(), url.clone());
        async move { git.read_file(&url, &sha, path, cap).await }
    };
    assert_eq!(
        read(first.clone(), ".ci.yml", 100).await.unwrap().unwrap(),
        b"version: 1\n"
    );
    assert_eq!(
        read(second.clone(), ".ci.yml", 100).await.unwrap().unwrap(),
        b"version: 2\n"
    );
    assert_eq!(
        read(first.clone(), "dir/f", 100).await.unwrap(),
        None,
        "not at that commit"
    );
    assert_eq!(
        read(second.clone(), "dir", 100).await.unwrap(),
        None,
        "a directory is not a file"
    );
    let e = read(second.clone(), ".ci.yml", 4).await.unwrap_err();
    assert!(e.to_string().contains("at most 4 are read"), "{e}");
    for bad in ["../x", "-x", "/etc/passwd", "a//b", "a:b"] {
        assert!(read(second.clone(), bad, 100).await.is_err(), "{bad}");
    }
    assert!(
        read("main".into(), ".ci.yml", 100).await.is_err(),
        "a full SHA only"
    );
}

struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Over the git protocol from a real `git daemon`; an unreachable server is
/// an error that is not `NotFound`, so a caller can tell "no such commit"
/// from "cannot ask".
#[tokio::test]
async fn a_git_server_is_fetched_from_and_an_unreachable_one_is_not_not_found() {
    let repo = GitRepo::new();
    let sha = repo.commit(&[("a", "1")], "first");
    std::fs::write(repo.path().join(".git/git-daemon-export-ok"), "").unwrap();
    let port = ci_testkit::free_port();
    let base = repo.path().parent().unwrap();
    let daemon = Daemon(
        Command::new("git")
            .args([
                "daemon",
                "--reuseaddr",
                "--listen=127.0.0.1",
                &format!("--port={port}"),
                &format!("--base-path={}", base.display()),
                &base.display().to_string(),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let name = repo.path().file_name().unwrap().to_string_lossy().into_owned();
    let url = RepoUrl::parse(&format!("git://127.0.0.1:{port}/{name}/.git")).unwrap();
    let work = tempfile::tempdir().unwrap();
    let git = Checkouts::new(work.path()).unwrap();
    let resolved = ci_testkit::wait_until("git daemon", std::time::Duration::from_secs(20), || {
        let (git, url) = (git.clone(), url.clone());
        async move { git.resolve(&url, &rev("main")).await.ok() }
    })
    .await;
    assert_eq!(resolved, sha);
    drop(daemon);

    let gone = RepoUrl::parse(&format!("git://127.0.0.1:{}/nothing", ci_testkit::free_port())).unwrap();
    match git.resolve(&gone, &rev("main")).await {
        Err(Error::Checkout(m)) => assert!(m.contains("clone"), "{m}"),
        other => panic!("{other:?}"),
    }
}
