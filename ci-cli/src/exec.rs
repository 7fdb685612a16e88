//! `ci exec`: the pipeline of the working tree, uncommitted changes and
//! all, run on this machine by the embedded cluster ([`LocalCluster`]):
//! the server's scheduling code with in-process shell and Docker runners.
//!
//! N.B.: the user's repository is only read. The snapshot is a commit
//! written to its object store (as `git stash create` would) through a
//! temporary index, and reached through a temporary repository that
//! borrows those objects (`objects/info/alternates`); no ref, index or
//! file of the user's changes.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use ci_agent::{Checkouts, DockerRunner, DockerSettings, ShellRunner};
use ci_core::coordinator::Event;
use ci_core::pipeline::{Pipeline, Trigger};
use ci_core::store::{Builds, Logs};
use ci_core::{
    async_trait, BuildStatus, CommitRef, Coordinator, Job, Labels, LocalCluster, LogSink, MemoryStore,
    NewBuild, RepoUrl, RunError, Runner, StepStatus,
};
use tokio::process::Command;

use crate::{duration, printable, read_pipeline, table, Error};

/// The label shell steps ask for here, so that they run in the shell and
/// not in a container.
const SHELL: &str = "runner=shell";

/// Runs `git` in `dir` and returns its standard output, trimmed.
async fn git(dir: &Path, args: &[&str], index: Option<&Path>) -> Result<String, Error> {
    let mut cmd = Command::new("git");
    cmd.arg("-C").arg(dir).args(args).kill_on_drop(true);
    if let Some(index) = index {
        cmd.env("GIT_INDEX_FILE", index);
    }
    let out = cmd
        .output()
        .await
        .map_err(|e| Error::Api(format!("cannot run git: {e}")))?;
    if !out.status.success() {
        return Err(Error::Api(format!(
            "git {}: {}",
            args.first().copied().unwrap_or_default(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// A commit of the working tree of the repository at `root` (tracked and
/// untracked files, as `.gitignore` allows), and a repository in `tmp`
/// that has it as `refs/heads/exec`.
async fn snapshot(root: &Path, tmp: &Path) -> Result<(PathBuf, String), Error> {
    let git_dir = PathBuf::from(git(root, &["rev-parse", "--absolute-git-dir"], None).await?);
    let common = git(
        root,
        &["rev-parse", "--path-format=absolute", "--git-common-dir"],
        None,
    )
    .await?;
    let index = tmp.join("index");
    // Starting from the real index, only changed files are hashed again.
    if let Err(e) = std::fs::copy(git_dir.join("index"), &index) {
        if e.kind() != std::io::ErrorKind::NotFound {
            return Err(Error::Api(format!("cannot copy the index: {e}")));
        }
    }
    git(root, &["add", "--all", "--", "."], Some(&index)).await?;
    let tree = git(root, &["write-tree"], Some(&index)).await?;
    let head = git(root, &["rev-parse", "--verify", "--quiet", "HEAD^{commit}"], None).await;
    let mut args = vec!["commit-tree", tree.as_str(), "-m", "ci exec: the working tree"];
    if let Ok(head) = &head {
        args.extend(["-p", head.as_str()]);
    }
    let commit = git(root, &args, Some(&index)).await?;
    let repo = tmp.join("exec.git");
    git(tmp, &["init", "--quiet", "--bare", "exec.git"], None).await?;
    let alternates = repo.join("objects").join("info").join("alternates");
    std::fs::write(
        &alternates,
        format!("{}\n", Path::new(&common).join("objects").display()),
    )
    .map_err(|e| Error::Api(format!("{}: {e}", alternates.display())))?;
    git(&repo, &["update-ref", "refs/heads/exec", &commit], None).await?;
    Ok((repo, commit))
}

/// A runner with labels and a capacity of its own.
struct Labelled {
    inner: Arc<dyn Runner>,
    labels: Labels,
    capacity: u32,
}

#[async_trait]
impl Runner for Labelled {
    fn capacity(&self) -> u32 {
        self.capacity
    }

    fn labels(&self) -> Labels {
        self.labels.clone()
    }

    async fn run(&self, job: &Job, log: &LogSink) -> Result<i32, RunError> {
        self.inner.run(job, log).await
    }
}

/// The pipeline to run: the file's steps for a manual build of `branch`,
/// or only the step named `only` (without its dependencies).
fn select(pipeline: &Pipeline, branch: Option<&str>, only: Option<&str>) -> Result<Pipeline, Error> {
    let selected = pipeline.select(branch, Trigger::Manual);
    let Some(only) = only else {
        return Ok(selected);
    };
    let step = pipeline
        .steps
        .iter()
        .find(|s| s.name == only || s.base == only)
        .cloned()
        .ok_or_else(|| {
            let names: Vec<&str> = pipeline.steps.iter().map(|s| s.name.as_str()).collect();
            Error::Api(format!("no step {only:?}; the steps are: {}", names.join(", ")))
        })?;
    let steps = pipeline
        .steps
        .iter()
        .filter(|s| s.name == step.name || (step.name != only && s.base == only))
        .map(|s| ci_core::pipeline::Step {
            depends_on: Vec::new(),
            ..s.clone()
        })
        .collect();
    Ok(Pipeline { steps })
}

/// `ci exec`: 0 if every step passed, 1 if not.
pub async fn exec(file: &Path, only: Option<&str>, jobs: Option<u32>) -> Result<u8, Error> {
    let cwd = std::env::current_dir().map_err(|e| Error::Api(format!("no working directory: {e}")))?;
    let root = PathBuf::from(git(&cwd, &["rev-parse", "--show-toplevel"], None).await?);
    let path = if file.is_absolute() {
        file.to_path_buf()
    } else {
        cwd.join(file)
    };
    let shown = file.display().to_string();
    let pipeline = match read_pipeline(&path, &shown)? {
        Ok(p) => p,
        Err(e) if e.line == 0 => {
            eprintln!("{shown}: {}", e.message);
            return Ok(1);
        }
        Err(e) => {
            eprintln!("{shown}:{e}");
            return Ok(1);
        }
    };
    let branch = git(&root, &["symbolic-ref", "--quiet", "--short", "HEAD"], None)
        .await
        .ok();
    let pipeline = select(&pipeline, branch.as_deref(), only)?;
    if pipeline.steps.is_empty() {
        return Err(Error::Api(format!(
            "{shown}: no step runs for a manual build of this branch"
        )));
    }

    let tmp = tempfile::Builder::new()
        .prefix("ci-exec-")
        .tempdir()
        .map_err(|e| Error::Api(format!("cannot make a temporary directory: {e}")))?;
    let (repo, commit) = snapshot(&root, tmp.path()).await?;
    eprintln!(
        "ci exec: {} step(s) of the working tree ({})",
        pipeline.steps.len(),
        &commit[..12]
    );

    let schemes = vec!["file".to_owned()];
    let checkouts =
        || Checkouts::new(tmp.path().join("work")).map_err(|e| Error::Api(format!("work directory: {e}")));
    let capacity = jobs.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| u32::try_from(n.get()).unwrap_or(1))
            .unwrap_or(1)
    });
    let shell_label = Labels::parse([SHELL]).map_err(|e| Error::Api(e.to_string()))?;
    let mut runners: Vec<Arc<dyn Runner>> = vec![Arc::new(Labelled {
        inner: Arc::new(ShellRunner::new(checkouts()?, schemes.clone())),
        labels: shell_label.clone(),
        capacity,
    })];
    if let Some(step) = pipeline.steps.iter().find(|s| s.image.is_some()) {
        let docker =
            DockerRunner::connect(checkouts()?, schemes, DockerSettings::default(), "ci-exec".into())
                .await
                .map_err(|e| Error::Api(format!("step {:?} has an image, and {e}", step.name)))?;
        let labels =
            Labels::parse([ci_core::pipeline::DOCKER_LABEL]).map_err(|e| Error::Api(e.to_string()))?;
        runners.push(Arc::new(Labelled {
            inner: Arc::new(docker),
            labels,
            capacity,
        }));
    }

    let mut steps = pipeline.to_new_steps();
    for step in &mut steps {
        if step.image.is_none() {
            step.labels =
                Labels::parse(step.labels.iter().chain([SHELL])).map_err(|e| Error::Api(e.to_string()))?;
        }
    }
    let repo_url =
        RepoUrl::parse(&format!("file://{}", repo.display())).map_err(|e| Error::Api(e.to_string()))?;
    let new = NewBuild {
        steps,
        branch,
        command: shown.clone(),
        ..NewBuild::new(
            repo_url,
            CommitRef::parse(&commit).map_err(|e| Error::Api(e.to_string()))?,
            shown,
        )
        .map_err(|e| Error::Api(e.to_string()))?
    };
    let store = Arc::new(MemoryStore::new());
    let coordinator = Coordinator::builder(store.clone())
        .build()
        .await
        .map_err(|e| Error::Api(e.to_string()))?;
    let cluster = LocalCluster::start(coordinator, runners)
        .await
        .map_err(|e| Error::Api(e.to_string()))?;
    let mut events = cluster.dispatcher().subscribe();
    let build = cluster
        .submit(&new)
        .await
        .map_err(|e| Error::Api(e.to_string()))?;

    // Each step's log as it ends.
    let printer = async {
        loop {
            match events.recv().await {
                Ok(Event::StepFinished {
                    step,
                    build: b,
                    status,
                }) if b == build.id => {
                    let st = store.step(step).await.ok().flatten();
                    let log = store.log(step, None).await.ok().flatten().unwrap_or_default();
                    if let Some(st) = st {
                        eprintln!(
                            "--- step {}: {status} {} ---",
                            printable(&st.name),
                            duration(st.duration_ms())
                        );
                    }
                    if status != StepStatus::Skipped {
                        print!("{}", log.stdout);
                        eprint!("{}", log.stderr);
                    }
                }
                Ok(Event::Finished { build: b, .. }) if b == build.id => return,
                Ok(_) => {}
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            }
        }
    };
    let interrupted = tokio::select! {
        () = printer => false,
        _ = tokio::signal::ctrl_c() => true,
    };
    let done = Builds::build(&*store, build.id)
        .await
        .map_err(|e| Error::Api(e.to_string()))?
        .ok_or_else(|| Error::Api("the build vanished".into()))?;
    cluster.shutdown().await;
    if interrupted {
        eprintln!("ci exec: interrupted");
        return Ok(130);
    }
    let rows: Vec<Vec<String>> = done
        .steps
        .iter()
        .map(|s| {
            vec![
                s.name.clone(),
                s.status.to_string(),
                s.exit_code.map(|c| c.to_string()).unwrap_or_default(),
                duration(s.duration_ms()),
            ]
        })
        .collect();
    eprint!("{}", table(&["STEP", "STATUS", "EXIT", "DURATION"], &rows));
    Ok(if done.status == BuildStatus::Success { 0 } else { 1 })
}
