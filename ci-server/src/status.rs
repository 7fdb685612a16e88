//! Commit statuses: each build's state, posted to its project's forge
//! (GitHub, Gitea/Forgejo, GitLab) with a link to the build's page.
//!
//! Statuses go out in the background: a forge that is down or slow never
//! holds a build back. Each build has at most one request in flight; a
//! failed one is tried again with backoff; what is sent is always the
//! build's state *now*, so the latest state wins and no stale one is sent
//! after it.

use std::collections::HashMap;
use std::time::Duration;

use ci_core::{Backoff, Build, BuildId, BuildStatus, Event, Forge, ForgeKind, Project, SecretName};
use serde_json::json;
use tokio::sync::{broadcast, mpsc};
use tokio::time::Instant;

use crate::api::App;

/// Tries per state before giving up.
const MAX_TRIES: u32 = 12;
/// How often to look whether any project has a forge.
const FORGES_EVERY: Duration = Duration::from_secs(2);
/// Time limit of one request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// What a forge is told.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
enum State {
    Pending,
    Running,
    Success,
    Failure,
    Canceled,
}

impl State {
    fn of(b: &Build) -> State {
        match b.status {
            BuildStatus::Queued => State::Pending,
            BuildStatus::Running => State::Running,
            BuildStatus::Success => State::Success,
            BuildStatus::Failed => State::Failure,
            BuildStatus::Canceled => State::Canceled,
        }
    }

    /// The forge's word for it.
    fn word(self, kind: ForgeKind) -> &'static str {
        match (kind, self) {
            (_, State::Pending) => "pending",
            (ForgeKind::Gitlab, State::Running) => "running",
            (_, State::Running) => "pending",
            (_, State::Success) => "success",
            (ForgeKind::Gitlab, State::Failure) => "failed",
            (_, State::Failure) => "failure",
            (ForgeKind::Gitlab, State::Canceled) => "canceled",
            // GitHub and Gitea have no "canceled": `error` is "did not
            // finish".
            (_, State::Canceled) => "error",
        }
    }

    fn description(self) -> &'static str {
        match self {
            State::Pending => "queued",
            State::Running => "running",
            State::Success => "passed",
            State::Failure => "failed",
            State::Canceled => "canceled",
        }
    }
}

/// One build's reporting.
struct Entry {
    /// The state the forge has.
    delivered: Option<State>,
    /// A request is out.
    in_flight: bool,
    /// Failed tries of the state being sent.
    tries: u32,
    /// Not before then.
    next: Instant,
    /// Something changed since the last look.
    dirty: bool,
}

/// Runs until the dispatcher's events end.
pub(crate) async fn report(app: App, mut events: broadcast::Receiver<Event>) {
    let client = match reqwest::Client::builder()
        .timeout(REQUEST_TIMEOUT)
        .redirect(reqwest::redirect::Policy::none())
        .user_agent("ci-server")
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(cause = %e, "commit statuses: no HTTP client");
            return;
        }
    };
    let Ok(backoff) = Backoff::new(Duration::from_millis(500), Duration::from_secs(60)) else {
        return;
    };
    let mut rng = fastrand::Rng::new();
    let mut builds: HashMap<BuildId, Entry> = HashMap::new();
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<(BuildId, Option<State>, bool)>();
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    // N.B.: whether any project has a forge, looked up every few seconds:
    // without one (the common case) events cost no store reads here, on
    // the scheduler's hot path.
    let mut forges = (false, Instant::now() - FORGES_EVERY);
    loop {
        tokio::select! {
            e = events.recv() => match e {
                Ok(Event::Created(b) | Event::Started { build: b, .. } | Event::Finished { build: b, .. }) => {
                    let entry = builds.entry(b).or_insert_with(|| Entry {
                        delivered: None,
                        in_flight: false,
                        tries: 0,
                        next: Instant::now(),
                        dirty: true,
                    });
                    entry.dirty = true;
                }
                Ok(_) => {}
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    // Events were lost: look at every build again.
                    tracing::warn!(lost = n, "commit statuses: events lost, looking again");
                    for e in builds.values_mut() {
                        e.dirty = true;
                    }
                }
                Err(broadcast::error::RecvError::Closed) => return,
            },
            Some((id, sent, ok)) = done_rx.recv() => {
                if let Some(e) = builds.get_mut(&id) {
                    e.in_flight = false;
                    if ok {
                        e.delivered = sent;
                        e.tries = 0;
                    } else {
                        e.tries += 1;
                        e.next = Instant::now() + backoff.delay(e.tries, &mut rng);
                        e.dirty = true;
                        if e.tries >= MAX_TRIES {
                            tracing::warn!(build = %id, "commit statuses: giving up on this build's status");
                            builds.remove(&id);
                        }
                    }
                }
            }
            _ = tick.tick() => {}
        }
        let now = Instant::now();
        if now.duration_since(forges.1) >= FORGES_EVERY {
            let any = app
                .store
                .projects()
                .await
                .map(|p| p.iter().any(|p| p.forge.is_some()))
                .unwrap_or(true);
            forges = (any, now);
        }
        if !forges.0 {
            // Kept a while: a forge set a moment ago still gets the
            // states of builds made since (their current ones).
            if builds.len() > 10_000 {
                builds.clear();
            }
            continue;
        }
        let due: Vec<BuildId> = builds
            .iter()
            .filter(|(_, e)| e.dirty && !e.in_flight && e.next <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in due {
            let Some(entry) = builds.get_mut(&id) else {
                continue;
            };
            entry.dirty = false;
            let Some((build, project, forge, token)) = target(&app, id).await else {
                builds.remove(&id);
                continue;
            };
            let state = State::of(&build);
            if entry.delivered == Some(state) {
                if build.status.is_finished() {
                    builds.remove(&id);
                }
                continue;
            }
            entry.in_flight = true;
            let (client, done, origin) = (client.clone(), done_tx.clone(), app.config.public_origin.clone());
            tokio::spawn(async move {
                let ok = send(
                    &client,
                    &forge,
                    &token,
                    &project,
                    &build,
                    state,
                    origin.as_deref(),
                )
                .await;
                let _ = done.send((build.id, Some(state), ok));
            });
        }
    }
}

/// The build, its project, its forge and the forge's token, if statuses
/// go anywhere.
async fn target(app: &App, id: BuildId) -> Option<(Build, Project, Forge, String)> {
    let build = app.store.build(id).await.ok()??;
    let is_sha = matches!(build.hash.len(), 40 | 64) && build.hash.bytes().all(|b| b.is_ascii_hexdigit());
    if !is_sha {
        return None;
    }
    let project = app.store.project(&build.source.project).await.ok()??;
    let forge = project.forge.clone()?;
    let wanted = [SecretName::FORGE_TOKEN.to_owned()];
    let sealed = app.store.secrets(&project.name, &wanted).await.ok()?;
    let (_, v) = sealed.first()?;
    let token = String::from_utf8(app.vault.open_value(&project.name, SecretName::FORGE_TOKEN, v)?).ok()?;
    Some((build, project, forge, token))
}

/// Posts one status; true if the forge took it.
async fn send(
    client: &reqwest::Client,
    forge: &Forge,
    token: &str,
    project: &Project,
    build: &Build,
    state: State,
    origin: Option<&str>,
) -> bool {
    let base = forge.url.trim_end_matches('/');
    let context = format!("ci/{}", project.name);
    let target = origin.map(|o| format!("{o}/builds/{}", build.id));
    let description = format!("{}#{} {}", project.name, build.number, state.description());
    let word = state.word(forge.kind);
    let req = match forge.kind {
        ForgeKind::Github => client
            .post(format!("{base}/repos/{}/statuses/{}", forge.repo, build.hash))
            .bearer_auth(token)
            .header("accept", "application/vnd.github+json")
            .json(
                &json!({"state": word, "target_url": target, "description": description, "context": context}),
            ),
        ForgeKind::Gitea => client
            .post(format!(
                "{base}/api/v1/repos/{}/statuses/{}",
                forge.repo, build.hash
            ))
            .header("authorization", format!("token {token}"))
            .json(
                &json!({"state": word, "target_url": target, "description": description, "context": context}),
            ),
        ForgeKind::Gitlab => {
            let id = percent_encoding::utf8_percent_encode(&forge.repo, percent_encoding::NON_ALPHANUMERIC);
            client
                .post(format!("{base}/api/v4/projects/{id}/statuses/{}", build.hash))
                .header("private-token", token)
                .json(&json!({"state": word, "target_url": target, "description": description, "name": context}))
        }
    };
    match req.send().await {
        Ok(r) if r.status().is_success() => true,
        Ok(r) => {
            tracing::warn!(build = %build.id, forge = %base, status = %r.status(), "commit status refused");
            false
        }
        Err(e) => {
            tracing::warn!(build = %build.id, forge = %base, cause = %ci_core::error::chain(&e), "commit status not sent");
            false
        }
    }
}
