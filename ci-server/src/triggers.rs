//! Builds started by the repositories themselves: a commit pushed
//! (`start`, shared by webhooks and polling) and the [`Poller`] that
//! watches every project's remote with `git ls-remote`.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use ci_core::pipeline::Trigger;
use ci_core::protocol::CreateBuild;
use ci_core::store::BuildFilter;
use ci_core::{Build, CommitRef, Page, Project, Source};
use tokio::sync::{Notify, Semaphore};
use tokio::time::Instant;

use crate::api::{ApiError, App};

/// A commit a repository says to build.
#[derive(Clone, Debug, Default)]
pub(crate) struct Push {
    /// Push, pull request or tag.
    pub event: Option<Trigger>,
    /// The branch (of a pull request: the one it merges into).
    pub branch: Option<String>,
    /// The full SHA.
    pub sha: String,
    /// The commit's message, when the forge said.
    pub message: Option<String>,
    /// Its author, when the forge said.
    pub author: Option<String>,
    /// From a fork: no secrets.
    pub untrusted: bool,
    /// The forge's delivery id.
    pub delivery: Option<String>,
}

/// Why a push started no build.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Skipped {
    /// `[skip ci]`.
    Asked,
    /// The project builds no such branch.
    Branch,
    /// A build of this commit of this branch exists (the other trigger
    /// got there first).
    Built,
}

impl Skipped {
    pub(crate) fn as_str(&self) -> &'static str {
        match self {
            Skipped::Asked => "the commit message says [skip ci]",
            Skipped::Branch => "the project does not build this branch",
            Skipped::Built => "this commit of this branch was built already",
        }
    }
}

/// Starts the build `push` asks for in `project`, unless it is skipped;
/// with `cancelPrevious`, cancels the branch's older unfinished builds.
pub(crate) async fn start(
    app: &App,
    project: &Project,
    push: Push,
) -> Result<Result<Build, Skipped>, ApiError> {
    let event = push.event.unwrap_or(Trigger::Push);
    if let (Trigger::Push, Some(b)) = (event, &push.branch) {
        if !project.builds_branch(b) {
            return Ok(Err(Skipped::Branch));
        }
    }
    let repo = crate::api::project_repo(app, project)?;
    let sha = CommitRef::parse(&push.sha)?;
    let mut message = push.message.clone();
    let mut author = push.author.clone();
    if message.is_none() {
        if let Some(resolver) = &app.resolver {
            if let Ok(Some(r)) = resolver.resolve(&repo, &sha).await {
                if let Some(info) = resolver.commit_info(&repo, &r.sha).await {
                    message = Some(info.message);
                    author = author.or(Some(info.author));
                }
            }
        }
    }
    if message.as_deref().is_some_and(ci_core::project::skips_ci) {
        return Ok(Err(Skipped::Asked));
    }
    let recent = branch_builds(app, project, push.branch.as_deref()).await?;
    if recent
        .iter()
        .any(|b| b.hash == sha.as_str() && b.source.event == Some(event) && event == Trigger::Push)
    {
        return Ok(Err(Skipped::Built));
    }
    let source = Source {
        project: project.name.clone(),
        event: Some(event),
        subject: message
            .as_deref()
            .map(|m| m.lines().next().unwrap_or_default().to_owned()),
        author,
        untrusted: push.untrusted,
        delivery: push.delivery,
    };
    let body = CreateBuild {
        hash: sha.as_str().to_owned(),
        branch: push.branch.clone(),
        ..CreateBuild::default()
    };
    let build = crate::api::create_build(app, source, body).await?;
    if project.cancel_previous && push.branch.is_some() {
        for older in recent
            .iter()
            .filter(|b| b.id < build.id && !b.status.is_finished() && b.source.event == Some(event))
        {
            match app.dispatcher.cancel(older.id).await {
                Ok(_) => {
                    tracing::info!(project = %project.name, build = %older.id, newer = %build.id, "canceled: a newer commit of its branch arrived")
                }
                Err(e) => tracing::warn!(build = %older.id, cause = %e, "could not cancel the older build"),
            }
        }
    }
    Ok(Ok(build))
}

/// The latest builds of a branch of `project`.
async fn branch_builds(app: &App, project: &Project, branch: Option<&str>) -> Result<Vec<Build>, ApiError> {
    let Some(branch) = branch else {
        return Ok(Vec::new());
    };
    let filter = BuildFilter {
        project: Some(project.name.clone()),
        branch: Some(branch.to_owned()),
        status: Vec::new(),
    };
    let page = Page {
        limit: 20,
        ..Page::default()
    };
    Ok(app.store.find_builds(&filter, page).await?)
}

// === the poller ===

/// Watches each project's remote every `pollInterval` seconds: a branch
/// whose tip moved starts a build of the new tip (many commits pushed at
/// once build only the newest). The first look at a project only notes
/// where its branches are.
#[derive(Debug, Default)]
pub struct Poller {
    wake: Notify,
}

impl Poller {
    /// Looks again now (a project was made or changed).
    pub fn wake(&self) {
        self.wake.notify_one();
    }
}

/// Runs the poller until `stop` resolves.
pub(crate) async fn poll_loop(app: App, stop: impl std::future::Future<Output = ()>) {
    let Some(resolver) = app.resolver.clone() else {
        return;
    };
    let gate = Arc::new(Semaphore::new(app.config.poll_parallel));
    // When each project is next due, and the settings it was due by.
    let mut due: HashMap<String, (Instant, u32, String)> = HashMap::new();
    let in_flight: Arc<std::sync::Mutex<HashSet<String>>> = Arc::default();
    let baselined: Arc<std::sync::Mutex<HashSet<String>>> = Arc::default();
    tokio::pin!(stop);
    loop {
        let projects = match app.store.projects().await {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(cause = %e, "poller: cannot read the projects");
                Vec::new()
            }
        };
        let now = Instant::now();
        due.retain(|name, _| projects.iter().any(|p| &p.name == name));
        let mut next = now + Duration::from_secs(1);
        for p in projects {
            if p.poll_interval_s == 0 || (p.repo.is_empty() && p.name != Project::DEFAULT) {
                due.remove(&p.name);
                continue;
            }
            let every = Duration::from_secs(u64::from(p.poll_interval_s));
            let entry = due
                .entry(p.name.clone())
                .or_insert((now, p.poll_interval_s, p.repo.clone()));
            if entry.1 != p.poll_interval_s || entry.2 != p.repo {
                // Changed settings: look now.
                *entry = (now, p.poll_interval_s, p.repo.clone());
            }
            if entry.0 > now {
                next = next.min(entry.0);
                continue;
            }
            if !in_flight
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .insert(p.name.clone())
            {
                continue;
            }
            entry.0 = now + every;
            next = next.min(entry.0);
            let (app, resolver, gate) = (app.clone(), resolver.clone(), gate.clone());
            let (in_flight, baselined) = (in_flight.clone(), baselined.clone());
            tokio::spawn(async move {
                if let Ok(_permit) = gate.acquire().await {
                    poll_one(&app, &resolver, &p, &baselined).await;
                }
                in_flight
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .remove(&p.name);
            });
        }
        tokio::select! {
            () = &mut stop => return,
            () = app.poller.wake.notified() => {}
            () = tokio::time::sleep_until(next) => {}
        }
    }
}

async fn poll_one(
    app: &App,
    resolver: &crate::resolve::Resolver,
    project: &Project,
    baselined: &std::sync::Mutex<HashSet<String>>,
) {
    let Ok(repo) = crate::api::project_repo(app, project) else {
        return;
    };
    let remote = match resolver.ls_remote(&repo).await {
        Ok(h) => h,
        Err(e) => {
            tracing::warn!(project = %project.name, cause = %e, "poller: cannot list the remote's branches");
            return;
        }
    };
    let known = match app.store.heads(&project.name).await {
        Ok(h) => h,
        Err(e) => {
            tracing::warn!(project = %project.name, cause = %e, "poller: cannot read the heads");
            return;
        }
    };
    let first = known.is_empty()
        && baselined
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(project.name.clone());
    let mut seen = Vec::with_capacity(remote.len());
    for (branch, sha) in &remote {
        let old = known.iter().find(|(b, _)| b == branch).map(|(_, s)| s);
        if first || old == Some(sha) {
            seen.push((branch.clone(), sha.clone()));
            continue;
        }
        let push = Push {
            event: Some(Trigger::Push),
            branch: Some(branch.clone()),
            sha: sha.clone(),
            ..Push::default()
        };
        match start(app, project, push).await {
            Ok(Ok(b)) => {
                tracing::info!(project = %project.name, %branch, sha = %sha, build = %b.id, "poller: new commit, build started");
                seen.push((branch.clone(), sha.clone()));
            }
            Ok(Err(why)) => {
                tracing::info!(project = %project.name, %branch, sha = %sha, why = why.as_str(), "poller: new commit, no build");
                seen.push((branch.clone(), sha.clone()));
            }
            Err(e) if e.status().is_client_error() => {
                // The commit cannot be built as it is (its pipeline runs no
                // step for a push to this branch, the server has no
                // command for it): trying again would say the same.
                tracing::info!(project = %project.name, %branch, sha = %sha, why = e.message(), "poller: new commit, no build");
                seen.push((branch.clone(), sha.clone()));
            }
            Err(e) => {
                // N.B.: the old head is kept, so the next look tries again.
                tracing::warn!(project = %project.name, %branch, cause = ?e, "poller: cannot start the build");
                if let Some(old) = old {
                    seen.push((branch.clone(), old.clone()));
                }
            }
        }
    }
    if seen != known {
        if let Err(e) = app.store.set_heads(&project.name, &seen).await {
            tracing::warn!(project = %project.name, cause = %e, "poller: cannot keep the heads");
        }
    }
}
