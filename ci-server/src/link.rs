//! Delivering builds to agents over HTTP: `POST {agent}/build`.

use std::time::Duration;

use async_trait::async_trait;
use std::sync::Arc;

use ci_core::protocol::{ErrorBody, SecretEnv};
use ci_core::{AgentLink, Dispatch, DispatchFailure, StopOrder};
use reqwest::StatusCode;

/// An [`AgentLink`] that posts builds to agents.
#[derive(Debug, Clone)]
pub struct HttpLink {
    client: reqwest::Client,
    token: Option<String>,
    secrets: Option<Arc<StepSecrets>>,
}

/// Where the secrets a step lists come from: its project's, opened with
/// the server's key.
pub struct StepSecrets {
    store: Arc<dyn ci_core::Store>,
    vault: Arc<crate::vault::Vault>,
}

impl std::fmt::Debug for StepSecrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StepSecrets").finish_non_exhaustive()
    }
}

impl StepSecrets {
    /// Secrets of the projects in `store`, sealed by `vault`.
    pub fn new(store: Arc<dyn ci_core::Store>, vault: Arc<crate::vault::Vault>) -> StepSecrets {
        StepSecrets { store, vault }
    }

    /// The values of the secrets `step` lists; none for a build of
    /// untrusted code (a fork's pull request). A secret that is not set
    /// fails the step: it must not run without it.
    pub async fn for_step(&self, step: &ci_core::Step) -> Result<SecretEnv, DispatchFailure> {
        let mut env = SecretEnv::default();
        if step.secrets.is_empty() {
            return Ok(env);
        }
        let unavailable =
            |e: ci_core::Error| DispatchFailure::Busy(format!("cannot read the step's secrets: {e}"));
        let build = self
            .store
            .build(step.build)
            .await
            .map_err(unavailable)?
            .ok_or_else(|| DispatchFailure::Rejected(format!("build {} is gone", step.build)))?;
        if build.source.untrusted {
            return Ok(env);
        }
        let project = &build.source.project;
        let sealed = self
            .store
            .secrets(project, &step.secrets)
            .await
            .map_err(unavailable)?;
        for name in &step.secrets {
            let value = sealed
                .iter()
                .find(|(n, _)| n == name)
                .and_then(|(_, v)| self.vault.open_value(project, name, v))
                .and_then(|v| String::from_utf8(v).ok())
                .ok_or_else(|| {
                    DispatchFailure::Rejected(format!(
                        "secret {name} is not set in project {project:?} (or does not open with this server's key)"
                    ))
                })?;
            env.0.insert(name.clone(), value);
        }
        Ok(env)
    }
}

impl HttpLink {
    /// A link whose requests give up after `timeout`, presenting `token`
    /// (the agent token) if set.
    pub fn new(timeout: Duration, token: Option<String>) -> Result<HttpLink, reqwest::Error> {
        // N.B.: no redirects. A dispatch carries the command and the
        // repository's credentials; an "agent" answering 307 must not be
        // able to send them to another host.
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(2)))
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        Ok(HttpLink {
            client,
            token,
            secrets: None,
        })
    }

    /// Sends each step the secrets it lists.
    pub fn with_secrets(mut self, secrets: StepSecrets) -> HttpLink {
        self.secrets = Some(Arc::new(secrets));
        self
    }
}

impl HttpLink {
    /// What the agent is sent for `d`: the build and the secrets its step
    /// lists.
    pub(crate) async fn request_body(
        &self,
        d: &Dispatch,
    ) -> Result<ci_core::protocol::BuildRequest, DispatchFailure> {
        let mut body = d.request();
        if let Some(secrets) = &self.secrets {
            body.secrets = secrets.for_step(&d.step).await?;
        }
        Ok(body)
    }
}

#[async_trait]
impl AgentLink for HttpLink {
    async fn stop(&self, order: &StopOrder) -> Result<(), DispatchFailure> {
        let Some(body) = order.request() else {
            return Ok(());
        };
        let mut req = self
            .client
            .post(format!("{}/cancel", order.agent_url))
            .json(&body);
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        // The agent answers once the work is dead, which may take a while.
        let resp = req
            .timeout(std::time::Duration::from_secs(35))
            .send()
            .await
            .map_err(|e| DispatchFailure::Unreachable(ci_core::error::chain(&e)))?;
        match resp.status() {
            s if s.is_success() => Ok(()),
            // N.B.: an agent of the original design has no /cancel (express
            // answers "Cannot POST /cancel"): it cannot stop work, but it is
            // alive and keeps it.
            s @ (StatusCode::NOT_FOUND | StatusCode::METHOD_NOT_ALLOWED) => Err(DispatchFailure::Rejected(
                format!("cancel answered {s}: this agent cannot cancel"),
            )),
            s => Err(DispatchFailure::Unreachable(format!("cancel answered {s}"))),
        }
    }

    async fn dispatch(&self, d: &Dispatch) -> Result<(), DispatchFailure> {
        let url = format!("{}/build", d.agent_url);
        let body = self.request_body(d).await?;
        let mut req = self.client.post(&url).json(&body);
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        let resp = req
            .send()
            .await
            .map_err(|e| DispatchFailure::Unreachable(ci_core::error::chain(&e)))?;
        let status = resp.status();
        if status.is_success() {
            return Ok(());
        }
        let reason = match resp.json::<ErrorBody>().await {
            Ok(body) => format!("{status}: {}", body.error),
            Err(_) => status.to_string(),
        };
        Err(classify(status, reason))
    }
}

/// What an agent's answer to `POST /build` means for the dispatch:
/// - 409: busy with work we do not know of (a superseded attempt it was
///   never told of, or a registration it has not heard of yet). It is alive:
///   keep it, cool it down, requeue the build.
/// - 401, 403, 404: it does not take builds from us (credentials, source
///   address) or at this URL: drop it; it registers again with a clean slate.
/// - any other 4xx: it refuses this build, which would fail anywhere.
/// - 3xx (never followed), 5xx: drop it.
pub(crate) fn classify(status: StatusCode, reason: String) -> DispatchFailure {
    match status {
        StatusCode::CONFLICT => DispatchFailure::Busy(reason),
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN | StatusCode::NOT_FOUND => {
            DispatchFailure::Unreachable(reason)
        }
        s if s.is_client_error() => DispatchFailure::Rejected(reason),
        _ => DispatchFailure::Unreachable(reason),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ci_core::store::{Projects, Queue};
    use ci_core::{CommitRef, MemoryStore, NewBuild, NewStep, RepoUrl, Source, Timestamp};

    async fn step_of(store: &MemoryStore, untrusted: bool, secrets: &[&str]) -> ci_core::Step {
        let mut new = NewBuild::new(
            RepoUrl::parse("/srv/web").unwrap(),
            CommitRef::parse("abcdef1").unwrap(),
            ".ci.yml",
        )
        .unwrap();
        new.steps = vec![NewStep {
            name: "deploy".into(),
            command: "true".into(),
            secrets: secrets.iter().map(|s| s.to_string()).collect(),
            ..NewStep::default()
        }];
        new.source = Source {
            project: "web".into(),
            untrusted,
            ..Source::default()
        };
        store.create_build(&new, Timestamp(1)).await.unwrap().steps[0].clone()
    }

    /// A step gets exactly the secrets it lists, opened; a fork's pull
    /// request gets none; one that is not set fails the step (it is
    /// refused, not sent without it).
    #[tokio::test]
    async fn steps_get_the_secrets_they_list_and_forks_get_none() {
        let dir = tempfile::tempdir().unwrap();
        let vault = Arc::new(crate::vault::Vault::open(&dir.path().join("k")).unwrap());
        let store = Arc::new(MemoryStore::new());
        store
            .create_project(&ci_core::Project::new("web", "/srv/web"), Timestamp(0))
            .await
            .unwrap();
        for (name, value) in [("TOKEN", "t0ken-value"), ("OTHER", "other-value")] {
            let sealed = vault.seal("web", name, value.as_bytes()).unwrap();
            store
                .put_secret("web", name, &sealed, Timestamp(0))
                .await
                .unwrap();
        }
        let secrets = StepSecrets::new(store.clone(), vault);

        let trusted = step_of(&store, false, &["TOKEN"]).await;
        let env = secrets.for_step(&trusted).await.unwrap();
        assert_eq!(
            env.0.into_iter().collect::<Vec<_>>(),
            [("TOKEN".into(), "t0ken-value".into())]
        );
        assert_eq!(
            format!("{:?}", secrets.for_step(&trusted).await.unwrap()),
            r#"{"TOKEN"}"#
        );

        let fork = step_of(&store, true, &["TOKEN"]).await;
        assert!(secrets.for_step(&fork).await.unwrap().is_empty());

        let none = step_of(&store, false, &[]).await;
        assert!(secrets.for_step(&none).await.unwrap().is_empty());

        let missing = step_of(&store, false, &["TOKEN", "NOT_SET"]).await;
        match secrets.for_step(&missing).await {
            Err(DispatchFailure::Rejected(why)) => assert!(why.contains("NOT_SET"), "{why}"),
            other => panic!("{other:?}"),
        }
    }
}
