//! Test support for the ci workspace. Tests use real parts: git
//! repositories in temp dirs, real processes, real HTTP on loopback.
//!
//! # Layout
//! - [`GitRepo`]: a repository with commits made on demand.
//! - [`GitDaemon`]: a git server (`git daemon`) on loopback.
//! - [`Proc`]: a spawned binary, killed with SIGKILL when dropped, whose
//!   output goes to a log file that is printed if the test fails.
//! - [`wait_until`]: polls a condition until it holds or a deadline passes.
//! - [`free_port`], [`bin`]: ports and the workspace's binaries.

#![forbid(unsafe_code)]
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

// === git ===

/// A git repository in a temp dir, on branch `main`.
pub struct GitRepo {
    dir: tempfile::TempDir,
}

impl Default for GitRepo {
    fn default() -> Self {
        Self::new()
    }
}

impl GitRepo {
    pub fn new() -> GitRepo {
        let dir = tempfile::tempdir().unwrap();
        let repo = GitRepo { dir };
        repo.git(&["init", "--quiet", "--initial-branch=main"]);
        repo
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// `file://` URL of the repository.
    pub fn url(&self) -> String {
        format!("file://{}", self.path().display())
    }

    pub fn git(&self, args: &[&str]) -> String {
        let out = Command::new("git")
            .arg("-C")
            .arg(self.path())
            .args([
                "-c",
                "user.name=ci",
                "-c",
                "user.email=ci@localhost",
                "-c",
                "commit.gpgsign=false",
            ])
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "git {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    }

    /// Writes `files` and commits them; returns the commit's SHA.
    pub fn commit(&self, files: &[(&str, &str)], message: &str) -> String {
        for (name, content) in files {
            let p = self.path().join(name);
            if let Some(parent) = p.parent() {
                std::fs::create_dir_all(parent).unwrap();
            }
            std::fs::write(p, content).unwrap();
        }
        self.git(&["add", "--all"]);
        self.git(&["commit", "--quiet", "--allow-empty", "-m", message]);
        self.git(&["rev-parse", "HEAD"])
    }
}

/// `git daemon` serving bare repositories on 127.0.0.1, pushes allowed:
/// a real git server. Killed when dropped.
pub struct GitDaemon {
    root: tempfile::TempDir,
    port: u16,
    child: Child,
}

impl GitDaemon {
    pub fn start() -> GitDaemon {
        let root = tempfile::tempdir().unwrap();
        let port = free_port();
        let child = Command::new("git")
            .args([
                "daemon",
                "--reuseaddr",
                "--export-all",
                "--enable=receive-pack",
                "--listen=127.0.0.1",
            ])
            .arg(format!("--port={port}"))
            .arg(format!("--base-path={}", root.path().display()))
            .arg(root.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let daemon = GitDaemon { root, port, child };
        // Ready when it accepts connections.
        let mut tries = 0;
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            tries += 1;
            assert!(tries < 1000, "git daemon did not listen within 10 s");
            std::thread::sleep(Duration::from_millis(10));
        }
        daemon
    }

    /// Makes the bare repository `name` (`web.git`) and returns its URL.
    pub fn create(&self, name: &str) -> String {
        let out = Command::new("git")
            .args(["init", "--quiet", "--bare", "--initial-branch=main"])
            .arg(self.root.path().join(name))
            .output()
            .unwrap();
        assert!(out.status.success());
        self.url(name)
    }

    pub fn url(&self, name: &str) -> String {
        format!("git://127.0.0.1:{}/{name}", self.port)
    }
}

impl Drop for GitDaemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// === processes ===

/// Path of a binary of this workspace, in the same profile as the running
/// one: a test (`target/<profile>/deps/<test>`) or a binary such as
/// `ci-bench` (`target/<profile>/ci-bench`).
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let mut dir = exe.parent().unwrap();
    if dir.ends_with("deps") {
        dir = dir.parent().unwrap();
    }
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is not built; `cargo test --workspace` or `cargo build --workspace` builds it",
        path.display()
    );
    path
}

/// A free TCP port on 127.0.0.1 (bound, then released), for a process
/// started later to listen on.
///
/// N.B.: it is chosen below the kernel's ephemeral range. A port from that
/// range (what binding port 0 gives) can be taken, between release and
/// use, by any socket on the machine: an agent listening on port 0, or the
/// local end of an outgoing connection (50 agents retrying a server that is
/// not up yet make thousands). Below it, only another test picking the
/// same port at random could, and this process never hands one out twice.
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let (low, high) = (10_000, ephemeral_low.max(10_001));
    let mut given = GIVEN.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    loop {
        let port = fastrand::u16(low..high);
        if given.contains(&port) {
            continue;
        }
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            given.push(port);
            return port;
        }
    }
}

/// A running binary. SIGKILLed on drop; its log is printed if the test
/// panicked.
pub struct Proc {
    pub name: String,
    child: Child,
    log: PathBuf,
}

impl Proc {
    /// Starts `bin(name)` with `args` and `env`, logging to `log_dir`.
    pub fn spawn(name: &str, label: &str, args: &[&str], env: &[(&str, &str)], log_dir: &Path) -> Proc {
        let log = log_dir.join(format!("{label}.log"));
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let child = Command::new(bin(name))
            .args(args)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env(
                "RUST_LOG",
                std::env::var("CI_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap();
        Proc {
            name: label.to_owned(),
            child,
            log,
        }
    }

    /// Starts `wrapper wrapper_args... bin(name)` (e.g. `prlimit` or
    /// `setpriv`), with `env`, logging to `log_dir`.
    pub fn spawn_wrapped(
        wrapper: &str,
        wrapper_args: &[&str],
        name: &str,
        label: &str,
        env: &[(&str, &str)],
        log_dir: &Path,
    ) -> Proc {
        let log = log_dir.join(format!("{label}.log"));
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let child = Command::new(wrapper)
            .args(wrapper_args)
            .arg(bin(name))
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env(
                "RUST_LOG",
                std::env::var("CI_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap();
        Proc {
            name: label.to_owned(),
            child,
            log,
        }
    }

    pub fn pid(&self) -> Pid {
        Pid::from_raw(i32::try_from(self.child.id()).unwrap())
    }

    pub fn signal(&self, sig: Signal) {
        kill(self.pid(), sig).unwrap();
    }

    /// SIGKILL, and reap.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits for it to exit.
    pub fn wait(&mut self) -> std::process::ExitStatus {
        self.child.wait().unwrap()
    }

    /// Exit status if it has exited.
    pub fn try_wait(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().unwrap()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("===== log of {} =====\n{}", self.name, self.log());
        }
    }
}

// === waiting ===

/// Polls `check` every 10 ms until it returns `Some`, and returns that.
/// Panics with `what` if `timeout` passes first.
pub async fn wait_until<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// True if a process with this pid exists and is not a zombie (dead but
/// not yet reaped by its parent).
pub fn alive(pid: i32) -> bool {
    if kill(Pid::from_raw(pid), None).is_err() {
        return false;
    }
    // /proc/<pid>/stat: "pid (comm) S ...", the state after the last ')'.
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let state = stat
        .rsplit(')')
        .next()
        .and_then(|rest| rest.trim_start().chars().next());
    !matches!(state, Some('Z') | Some('X') | None)
}
