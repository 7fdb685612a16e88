//! The web UI: server-rendered HTML with a little plain JavaScript, embedded
//! in the binary (no build step).
//!
//! - `GET /`: the form to start a build, the builds table (paginated with
//!   `?page=`) and the agents table; both refresh every two seconds.
//! - `GET /projects`, `GET /projects/{name}`: projects with each branch's
//!   latest build, and a project's builds.
//! - `GET /builds/{id}`: a build's details, its output live while it runs,
//!   and Cancel and Rebuild buttons.
//!
//! Pages render their data on the server, so they read without
//! JavaScript. When the server has an `API_TOKEN`, pages carry no data: the
//! script asks for the token once, keeps it in the browser's local storage
//! and sends it with every request.

use std::fmt::Write;

use futures_util::StreamExt;

use ci_core::protocol::BuildView;
use ci_core::{Build, BuildId, Page};
use warp::http::StatusCode;
use warp::reply::{html, with_header, with_status, Response};
use warp::{Filter, Rejection, Reply};

use crate::api::{with_app, App};

const STYLE: &str = include_str!("../ui/style.css");
const SCRIPT: &str = include_str!("../ui/app.js");
/// Builds per page.
const PAGE_SIZE: usize = 25;

/// The UI's routes.
pub(crate) fn routes(app: App) -> impl Filter<Extract = (Response,), Error = Rejection> + Clone {
    let assets = warp::path!("ui" / String)
        .and(warp::get())
        .and_then(|name: String| async move {
            let (body, kind) = match name.as_str() {
                "style.css" => (STYLE, "text/css; charset=utf-8"),
                "app.js" => (SCRIPT, "text/javascript; charset=utf-8"),
                _ => return Err(warp::reject::not_found()),
            };
            let r = with_header(body, "content-type", kind);
            Ok(with_header(r, "cache-control", "no-cache").into_response())
        });
    let index = warp::path::end()
        .and(warp::get())
        .and(with_app(app.clone()))
        .and(warp::query::<std::collections::HashMap<String, String>>())
        .and_then(
            |app: App, q: std::collections::HashMap<String, String>| async move {
                let page = q
                    .get("page")
                    .and_then(|p| p.parse::<usize>().ok())
                    .filter(|p| *p >= 1)
                    .unwrap_or(1);
                Ok::<_, Rejection>(index_page(&app, page).await)
            },
        );
    let build = warp::path("builds")
        .and(warp::path::param::<String>())
        .and(warp::path::end())
        .and(warp::get())
        .and(with_app(app.clone()))
        .and(warp::query::<std::collections::HashMap<String, String>>())
        .and_then(
            |id: String, app: App, q: std::collections::HashMap<String, String>| async move {
                Ok::<_, Rejection>(match id.parse::<i64>().ok().filter(|n| *n > 0) {
                    Some(n) => build_page(&app, BuildId(n), q.get("step").map(String::as_str)).await,
                    None => with_status(
                        html(shell("Not found", "", "<p>No such build.</p>", &app)),
                        StatusCode::NOT_FOUND,
                    )
                    .into_response(),
                })
            },
        );
    let projects = warp::path("projects")
        .and(warp::path::end())
        .and(warp::get())
        .and(with_app(app.clone()))
        .and_then(|app: App| async move { Ok::<_, Rejection>(projects_page(&app).await) });
    let project = warp::path("projects")
        .and(warp::path::param::<String>())
        .and(warp::path::end())
        .and(warp::get())
        .and(with_app(app.clone()))
        .and_then(|name: String, app: App| async move {
            let name = percent_encoding::percent_decode_str(&name)
                .decode_utf8_lossy()
                .into_owned();
            Ok::<_, Rejection>(project_page(&app, &name).await)
        });
    assets
        .or(index)
        .unify()
        .or(build)
        .unify()
        .or(projects)
        .unify()
        .or(project)
        .unify()
}

/// Escapes text for HTML.
fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn status(s: &str) -> String {
    let icon = match s {
        "success" => "✔",
        "failed" => "✖",
        "running" => "⟳",
        "queued" => "…",
        "canceled" => "⊘",
        "idle" => "○",
        "busy" => "●",
        _ => "",
    };
    format!(r#"<span class="status status-{s}"><span aria-hidden="true">{icon}</span> {s}</span>"#)
}

fn duration(ms: Option<u64>) -> String {
    match ms {
        None => String::new(),
        Some(ms) if ms < 1000 => format!("{ms} ms"),
        Some(ms) if ms < 60_000 => format!("{:.1} s", ms as f64 / 1000.0),
        Some(ms) => format!("{} min {} s", ms / 60_000, (ms % 60_000) / 1000),
    }
}

fn shell(title: &str, body_attrs: &str, main: &str, app: &App) -> String {
    let token = if app.config.api_token.is_some() {
        "required"
    } else {
        "none"
    };
    format!(
        r#"<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title} · ci</title>
<link rel="stylesheet" href="/ui/style.css">
</head>
<body data-token="{token}" {body_attrs}>
<header><h1><a href="/">ci</a></h1><nav><a href="/projects">Projects</a></nav><span class="muted">{repo}</span></header>
<main>
<form id="token-form" class="new" hidden>
  <label for="token">API token</label><input id="token" name="token" type="password" autocomplete="current-password">
  <button type="submit">Save</button>
</form>
{main}
</main>
<script src="/ui/app.js" defer></script>
</body>
</html>
"#,
        title = esc(title),
        repo = esc(&app.config.repo.to_string()),
    )
}

/// What started a build, for people.
fn event_name(b: &BuildView) -> String {
    use ci_core::pipeline::Trigger;
    let what = match b.event {
        Some(Trigger::Push) => "push",
        Some(Trigger::PullRequest) => "pull request",
        Some(Trigger::Tag) => "tag",
        Some(Trigger::Manual) => "manual",
        Some(Trigger::Api) => "API",
        None => "",
    };
    if b.untrusted {
        format!("{what} (from a fork: no secrets)")
    } else {
        what.to_owned()
    }
}

/// `GET /projects`: every project, each branch with its latest build.
async fn projects_page(app: &App) -> Response {
    let show = app.config.api_token.is_none();
    let mut rows = String::new();
    let projects = if show {
        app.store.projects().await.unwrap_or_default()
    } else {
        Vec::new()
    };
    for p in &projects {
        let filter = ci_core::store::BuildFilter {
            project: Some(p.name.clone()),
            ..Default::default()
        };
        let recent = app
            .store
            .find_builds(
                &filter,
                Page {
                    limit: 100,
                    ..Page::default()
                },
            )
            .await
            .unwrap_or_default();
        let mut branches: Vec<String> = Vec::new();
        let mut seen: Vec<&str> = Vec::new();
        for b in &recent {
            let Some(branch) = b.branch.as_deref() else {
                continue;
            };
            if seen.contains(&branch) {
                continue;
            }
            seen.push(branch);
            branches.push(format!(
                r#"<li><code>{}</code> <a href="/builds/{}">#{}</a> {}</li>"#,
                esc(branch),
                b.id,
                b.number,
                status(b.status.as_str())
            ));
        }
        let _ = write!(
            rows,
            r#"<tr><td><a href="/projects/{n}">{n}</a></td><td><code>{repo}</code></td><td><ul class="branches">{br}</ul></td></tr>"#,
            n = esc(&p.name),
            repo = esc(&ci_core::model::redact_url(&p.repo)),
            br = branches.join(""),
        );
    }
    if rows.is_empty() {
        rows = r#"<tr><td colspan="3" class="muted">No projects.</td></tr>"#.into();
    }
    let main = format!(
        r#"<section aria-labelledby="projects-h">
<h2 id="projects-h">Projects</h2>
<div class="table-wrap"><table id="projects">
<thead><tr><th scope="col">Project</th><th scope="col">Repository</th><th scope="col">Branches</th></tr></thead>
<tbody>{rows}</tbody>
</table></div>
</section>"#
    );
    html(shell("Projects", r#"data-page="projects""#, &main, app)).into_response()
}

/// `GET /projects/{name}`: a project's builds.
async fn project_page(app: &App, name: &str) -> Response {
    let show = app.config.api_token.is_none();
    let project = match app.store.project(name).await {
        Ok(Some(p)) => p,
        _ => {
            return with_status(
                html(shell("Not found", "", "<p>No such project.</p>", app)),
                StatusCode::NOT_FOUND,
            )
            .into_response()
        }
    };
    let filter = ci_core::store::BuildFilter {
        project: Some(project.name.clone()),
        ..Default::default()
    };
    let builds = if show {
        app.store
            .find_builds(
                &filter,
                Page {
                    limit: PAGE_SIZE,
                    ..Page::default()
                },
            )
            .await
            .unwrap_or_default()
    } else {
        Vec::new()
    };
    let mut rows = String::new();
    for b in &builds {
        let v = BuildView::from(b);
        let _ = write!(
            rows,
            r#"<tr><td><a href="/builds/{id}">#{n}</a></td><td>{branch}</td><td><code>{hash}</code> {subject}</td><td>{event}</td><td>{st}</td><td>{dur}</td></tr>"#,
            id = v.id,
            n = v.number,
            branch = esc(v.branch.as_deref().unwrap_or("")),
            hash = esc(&v.hash[..v.hash.len().min(12)]),
            subject = esc(v.subject.as_deref().unwrap_or("")),
            event = esc(&event_name(&v)),
            st = status(v.status.as_str()),
            dur = duration(v.duration_ms),
        );
    }
    if rows.is_empty() {
        rows = r#"<tr><td colspan="6" class="muted">No builds yet.</td></tr>"#.into();
    }
    let main = format!(
        r#"<h2>{name}</h2>
<dl class="details">
  <dt>Repository</dt><dd><code>{repo}</code></dd>
  <dt>Default branch</dt><dd>{branch}</dd>
  <dt>Polling</dt><dd>{poll}</dd>
</dl>
<section aria-labelledby="builds-h">
<h3 id="builds-h">Builds</h3>
<div class="table-wrap"><table id="project-builds">
<thead><tr><th scope="col">Build</th><th scope="col">Branch</th><th scope="col">Commit</th><th scope="col">Started by</th><th scope="col">Status</th><th scope="col">Duration</th></tr></thead>
<tbody>{rows}</tbody>
</table></div>
</section>"#,
        name = esc(&project.name),
        repo = esc(&ci_core::model::redact_url(&project.repo)),
        branch = esc(&project.default_branch),
        poll = match project.poll_interval_s {
            0 => "off".to_owned(),
            s => format!("every {s} s"),
        },
    );
    html(shell(&project.name, r#"data-page="project""#, &main, app)).into_response()
}

fn build_row(b: &BuildView) -> String {
    format!(
        r#"<tr><td><a href="/builds/{id}">#{id}</a></td><td><code>{hash}</code></td><td class="command"><code>{cmd}</code></td><td>{st}</td><td>{agent}</td><td>{dur}</td></tr>"#,
        id = b.id,
        hash = esc(&b.hash[..b.hash.len().min(12)]),
        cmd = esc(&b.command),
        st = status(b.status.as_str()),
        agent = esc(b.agent.as_deref().unwrap_or("")),
        dur = duration(b.duration_ms),
    )
}

async fn index_page(app: &App, page: usize) -> Response {
    // With a token, the page carries no data; the script fetches it.
    let show = app.config.api_token.is_none();
    let builds: Vec<BuildView> = if show {
        app.store
            .list_builds(Page {
                limit: PAGE_SIZE,
                offset: (page - 1).saturating_mul(PAGE_SIZE),
                before: None,
            })
            .await
            .map(|bs| bs.iter().map(BuildView::from).collect())
            .unwrap_or_default()
    } else {
        Vec::new()
    };
    let mut rows = String::new();
    for b in &builds {
        rows.push_str(&build_row(b));
    }
    if rows.is_empty() {
        rows = r#"<tr><td colspan="6" class="muted">No builds yet.</td></tr>"#.into();
    }
    let mut agents = String::new();
    if show {
        for v in crate::api::agent_views(app).await.unwrap_or_default() {
            let _ = write!(
                agents,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                v.id,
                esc(&v.url),
                status(if v.steps.is_empty() { "idle" } else { "busy" }),
                esc(&v.last_seen),
                v.builds
                    .iter()
                    .map(|b| format!(r#"<a href="/builds/{b}">#{b}</a>"#))
                    .collect::<Vec<_>>()
                    .join(" "),
            );
        }
    }
    if agents.is_empty() {
        agents = r#"<tr><td colspan="5" class="muted">No agents registered.</td></tr>"#.into();
    }
    let default_cmd = app.config.build_command.as_deref().unwrap_or("");
    let newer = if page > 1 {
        format!(r#"<a rel="prev" href="/?page={}">← Newer</a>"#, page - 1)
    } else {
        String::new()
    };
    let older_hidden = if builds.len() < PAGE_SIZE && show {
        " hidden"
    } else {
        ""
    };
    let main = format!(
        r#"<section aria-labelledby="new-h">
<h2 id="new-h">Start a build</h2>
<form id="build-form" class="new" method="post" action="/build">
  <label for="hash">Commit</label>
  <input id="hash" name="hash" required maxlength="255" placeholder="a SHA, a branch or a tag" autocomplete="off">
  <label for="command">Command</label>
  <input id="command" name="command" placeholder="{placeholder}" autocomplete="off">
  <button type="submit">Build</button>
  <p id="form-error" class="error" role="alert"></p>
</form>
</section>
<section aria-labelledby="builds-h">
<h2 id="builds-h">Builds</h2>
<div class="table-wrap"><table id="builds">
<caption class="sr-only">Builds, newest first</caption>
<thead><tr><th scope="col">Build</th><th scope="col">Commit</th><th scope="col">Command</th><th scope="col">Status</th><th scope="col">Agent</th><th scope="col">Duration</th></tr></thead>
<tbody>{rows}</tbody>
</table></div>
<nav class="pager" aria-label="Pages">{newer}<span>Page {page}</span><a rel="next" href="/?page={next}"{older_hidden}>Older →</a></nav>
</section>
<section aria-labelledby="agents-h">
<h2 id="agents-h">Agents</h2>
<div class="table-wrap"><table id="agents">
<thead><tr><th scope="col">Agent</th><th scope="col">Address</th><th scope="col">Status</th><th scope="col">Last seen</th><th scope="col">Builds</th></tr></thead>
<tbody>{agents}</tbody>
</table></div>
</section>"#,
        placeholder = esc(if default_cmd.is_empty() {
            "required: the server has no default"
        } else {
            default_cmd
        }),
        next = page.saturating_add(1),
    );
    let attrs = format!(r#"data-page="index" data-page-number="{page}" data-page-size="{PAGE_SIZE}""#);
    html(shell("Builds", &attrs, &main, app)).into_response()
}

/// Marks where a stream's log goes in the page; `esc` turns every `<` of
/// user text into `&lt;`, so no text can contain these.
const STDOUT_MARK: &str = "<!--ci:stdout-->";
const STDERR_MARK: &str = "<!--ci:stderr-->";

/// The step whose log a build page shows: the one asked for, else the
/// first that failed, else the first running, else the last that ran,
/// else the first.
fn shown_step<'a>(build: &'a Build, asked: Option<&str>) -> Option<&'a ci_core::Step> {
    use ci_core::StepStatus;
    let steps = &build.steps;
    asked
        .and_then(|name| build.step(name))
        .or_else(|| {
            steps
                .iter()
                .find(|s| s.status == StepStatus::Failed && !s.allow_failure)
        })
        .or_else(|| steps.iter().find(|s| s.status == StepStatus::Running))
        .or_else(|| {
            steps
                .iter()
                .rev()
                .find(|s| s.attempt.0 > 0 || s.status == StepStatus::Failed)
        })
        .or_else(|| steps.first())
}

/// The steps as columns by depth: each step one column right of the
/// deepest step it depends on.
fn step_columns(build: &Build, shown: Option<&str>) -> String {
    if build.steps.len() < 2 {
        return String::new();
    }
    let mut depth: Vec<usize> = Vec::with_capacity(build.steps.len());
    for (i, step) in build.steps.iter().enumerate() {
        let d = step
            .depends_on
            .iter()
            .filter_map(|dep| build.steps[..i].iter().position(|s| &s.name == dep))
            .map(|j| depth[j] + 1)
            .max()
            .unwrap_or(0);
        depth.push(d);
    }
    let deepest = depth.iter().copied().max().unwrap_or(0);
    let mut columns = String::new();
    for d in 0..=deepest {
        columns.push_str(r#"<ol class="column">"#);
        for (i, step) in build.steps.iter().enumerate().filter(|(i, _)| depth[*i] == d) {
            let current = if shown == Some(step.name.as_str()) {
                r#" aria-current="true""#
            } else {
                ""
            };
            let may_fail = if step.allow_failure {
                r#" <span class="muted">(may fail)</span>"#
            } else {
                ""
            };
            let after = if step.depends_on.is_empty() {
                String::new()
            } else {
                format!(
                    r#"<span class="muted after">after {}</span>"#,
                    esc(&step.depends_on.join(", "))
                )
            };
            let services = if step.services.is_empty() {
                String::new()
            } else {
                let names: Vec<&str> = step.services.iter().map(|s| s.name.as_str()).collect();
                format!(
                    r#"<span class="muted after">with {}</span>"#,
                    esc(&names.join(", "))
                )
            };
            columns.push_str(&format!(
                r#"<li class="step" id="step-{i}" data-name="{name}"><a href="?step={href}"{current}>{name}</a> <span class="st">{st}</span>{may_fail} <span class="muted dur">{dur}</span>{after}{services}</li>"#,
                name = esc(&step.name),
                href = percent_encoding::utf8_percent_encode(&step.name, percent_encoding::NON_ALPHANUMERIC),
                st = status(step.status.as_str()),
                dur = duration(step.duration_ms()),
            ));
        }
        columns.push_str("</ol>");
    }
    format!(
        r#"<section aria-labelledby="steps-h"><h3 id="steps-h">Steps</h3><div class="steps">{columns}</div></section>"#
    )
}

async fn build_page(app: &App, id: BuildId, asked: Option<&str>) -> Response {
    let show = app.config.api_token.is_none();
    let stored = match app.store.build(id).await {
        Ok(Some(b)) => Some(b),
        Ok(None) => {
            return with_status(
                html(shell("Not found", "", &format!("<p>No build #{id}.</p>"), app)),
                StatusCode::NOT_FOUND,
            )
            .into_response()
        }
        Err(_) => None,
    };
    let stored = stored.filter(|_| show);
    let build = match &stored {
        Some(b) => {
            let mut view = BuildView::from(b);
            if view.status == ci_core::BuildStatus::Queued || view.steps.iter().any(|s| !s.labels.is_empty())
            {
                view.explain_wait(&app.dispatcher.agents().await.unwrap_or_default());
            }
            Some(view)
        }
        None => None,
    };
    let step = stored.as_ref().and_then(|b| shown_step(b, asked)).cloned();
    let b = build;
    let field = |f: &dyn Fn(&BuildView) -> String| b.as_ref().map(f).unwrap_or_default();
    let info = match &step {
        Some(s) => app.store.log_info(s.id, None).await.ok().flatten(),
        None => None,
    };
    let steps = stored
        .as_ref()
        .map(|b| step_columns(b, step.as_ref().map(|s| s.name.as_str())))
        .unwrap_or_default();
    let log_title = match (&step, stored.as_ref().map(|b| b.steps.len())) {
        (Some(s), Some(n)) if n > 1 => format!("Log of {}", esc(&s.name)),
        _ => "Log".to_owned(),
    };
    let step_attr = step
        .as_ref()
        .map(|s| format!(r#" data-step="{}""#, esc(&s.name)))
        .unwrap_or_default();
    let main = format!(
        r#"<h2>Build #{id} <span id="status" aria-live="polite">{st}</span></h2>
<dl class="details">
  <dt>Project</dt><dd>{project}</dd>
  <dt>Started by</dt><dd>{event}</dd>
  <dt>Commit</dt><dd><code>{hash}</code></dd>
  <dt>Subject</dt><dd>{subject}</dd>
  <dt>Author</dt><dd>{author}</dd>
  <dt>Command</dt><dd><code>{cmd}</code></dd>
  <dt>Branch</dt><dd>{branch}</dd>
  <dt>Labels</dt><dd>{labels}</dd>
  <dt>Waiting</dt><dd id="d-waiting">{waiting}</dd>
  <dt>Agent</dt><dd id="d-agent">{agent}</dd>
  <dt>Attempt</dt><dd id="d-attempt">{attempt}</dd>
  <dt>Exit code</dt><dd id="d-exit">{exit}</dd>
  <dt>Created</dt><dd id="d-created">{created}</dd>
  <dt>Started</dt><dd id="d-started">{started}</dd>
  <dt>Finished</dt><dd id="d-finished">{finished}</dd>
  <dt>Duration</dt><dd id="d-duration">{dur}</dd>
</dl>
<div class="actions">
  <button id="cancel" type="button" class="secondary">Cancel</button>
  <button id="rebuild" type="button">Rebuild</button>
  <button id="retry" type="button" class="secondary">Retry failed steps</button>
  <p id="action-error" class="error" role="alert"></p>
</div>
{steps}
<h3 id="log-h">{log_title}</h3>
<section aria-labelledby="out-h"><h4 id="out-h">stdout</h4><pre id="stdout" class="log" tabindex="0">{STDOUT_MARK}</pre></section>
<section aria-labelledby="err-h"><h4 id="err-h">stderr</h4><pre id="stderr" class="log" tabindex="0">{STDERR_MARK}</pre></section>"#,
        st = field(&|b| status(b.status.as_str())),
        project = field(&|b| format!(
            r#"<a href="/projects/{p}">{p}</a> #{n}"#,
            p = esc(&b.project),
            n = b.number
        )),
        event = field(&|b| esc(&event_name(b))),
        subject = field(&|b| esc(b.subject.as_deref().unwrap_or(""))),
        author = field(&|b| esc(b.author.as_deref().unwrap_or(""))),
        hash = field(&|b| esc(&b.hash)),
        cmd = field(&|b| esc(&b.command)),
        branch = field(&|b| esc(b.branch.as_deref().unwrap_or(""))),
        labels = field(&|b| esc(&b.labels.iter().collect::<Vec<_>>().join(", "))),
        waiting = field(&|b| esc(b.waiting.as_deref().unwrap_or(""))),
        agent = field(&|b| esc(b.agent.as_deref().unwrap_or(""))),
        attempt = field(&|b| b.attempt.to_string()),
        exit = field(&|b| b.exit_code.map(|c| c.to_string()).unwrap_or_default()),
        created = field(&|b| esc(&b.created_at)),
        started = field(&|b| esc(b.started_at.as_deref().unwrap_or(""))),
        finished = field(&|b| esc(b.finished_at.as_deref().unwrap_or(""))),
        dur = field(&|b| duration(b.duration_ms)),
    );
    let page = shell(
        &format!("Build #{id}"),
        &format!(r#"data-page="build" data-build="{id}"{step_attr}"#),
        &main,
        app,
    );
    let (Some((head, rest)), Some(info), Some(step)) = (page.split_once(STDOUT_MARK), info, step) else {
        return html(page.replace(STDOUT_MARK, "").replace(STDERR_MARK, "")).into_response();
    };
    let (mid, tail) = rest.split_once(STDERR_MARK).unwrap_or((rest, ""));
    if info.stdout_len + info.stderr_len <= crate::logs::INLINE {
        let log = app
            .store
            .log(step.id, Some(info.attempt))
            .await
            .ok()
            .flatten()
            .unwrap_or_default();
        return html(format!(
            "{head}{}{mid}{}{tail}",
            ansi_html(&log.stdout),
            ansi_html(&log.stderr)
        ))
        .into_response();
    }
    // A large log streams into the page as it is read (its colour codes
    // dropped: a chunk may cut one in half).
    let part = |s: ci_core::Stream| {
        crate::logs::text(app.store.clone(), step.id, info, s, 0).map(|t| {
            t.map(|t| bytes::Bytes::from(esc(&strip_ansi(&t))))
                .map_err(|e| std::io::Error::other(e.to_string()))
        })
    };
    let piece = |s: &str| {
        futures_util::stream::once(futures_util::future::ready(Ok(bytes::Bytes::from(s.to_owned()))))
    };
    let body = piece(head)
        .chain(part(ci_core::Stream::Stdout))
        .chain(piece(mid))
        .chain(part(ci_core::Stream::Stderr))
        .chain(piece(tail))
        .boxed();
    let mut response = html("<p>This log is too large to show without Server::serve.</p>").into_response();
    crate::listen::Streamed::attach(&mut response, body);
    response
}

/// Text with its ANSI colour codes (SGR: `ESC [ ... m`) turned into
/// `<span class="ansi-...">`, everything else escaped; other escape
/// sequences are dropped. The same rules as the page's script.
fn ansi_html(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut open = false;
    let mut rest = text;
    while let Some(at) = rest.find('\u{1b}') {
        out.push_str(&esc(&rest[..at]));
        let seq = &rest[at + 1..];
        let Some(body) = seq.strip_prefix('[') else {
            rest = seq;
            continue;
        };
        let end = body
            .find(|c: char| ('@'..='~').contains(&c))
            .unwrap_or(body.len());
        let (params, fin) = (&body[..end], body[end..].chars().next());
        rest = body.get(end + fin.map_or(0, char::len_utf8)..).unwrap_or("");
        if fin != Some('m') {
            continue;
        }
        if open {
            out.push_str("</span>");
            open = false;
        }
        let classes: Vec<String> = params
            .split(';')
            .filter_map(|p| match p.parse::<u8>().ok()? {
                1 => Some("ansi-bold".to_owned()),
                n @ (30..=37 | 90..=97) => Some(format!("ansi-fg{}", n % 10 + if n >= 90 { 8 } else { 0 })),
                n @ (40..=47 | 100..=107) => {
                    Some(format!("ansi-bg{}", n % 10 + if n >= 100 { 8 } else { 0 }))
                }
                _ => None,
            })
            .collect();
        if !classes.is_empty() {
            out.push_str(&format!(r#"<span class="{}">"#, classes.join(" ")));
            open = true;
        }
    }
    out.push_str(&esc(rest));
    if open {
        out.push_str("</span>");
    }
    out
}

/// Text without ANSI escape sequences.
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find('\u{1b}') {
        out.push_str(&rest[..at]);
        let seq = &rest[at + 1..];
        rest = match seq.strip_prefix('[') {
            Some(body) => {
                let end = body
                    .find(|c: char| ('@'..='~').contains(&c))
                    .map_or(body.len(), |e| e + 1);
                body.get(end..).unwrap_or("")
            }
            None => seq,
        };
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ansi_colours_become_spans_and_nothing_else_gets_through() {
        assert_eq!(
            ansi_html("\u{1b}[32mok\u{1b}[0m <b>\u{1b}[1;31mbad"),
            r#"<span class="ansi-fg2">ok</span> &lt;b&gt;<span class="ansi-bold ansi-fg1">bad</span>"#
        );
        assert_eq!(ansi_html("\u{1b}[2K\u{1b}]x\u{1b}[9"), "]x");
        assert_eq!(strip_ansi("a\u{1b}[32mb\u{1b}[0mc\u{1b}["), "abc");
    }

    #[test]
    fn escapes_everything_that_matters() {
        assert_eq!(
            esc(r#"<script>alert("x&y")</script>'"#),
            "&lt;script&gt;alert(&quot;x&amp;y&quot;)&lt;/script&gt;&#39;"
        );
    }
}
