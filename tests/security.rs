//! The agent token, across real processes.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic

mod common;

use std::time::Duration;

use ci_core::BuildStatus;
use common::{wait_until, Cluster};

#[tokio::test]
async fn agents_need_the_token_and_builds_run_with_it() {
    let mut c = Cluster::new(300, 5);
    let sha = c.commit_script("echo guarded");
    c.agent_token = Some("the-agent-token-0123456789".into());
    c.start_server();
    c.start_agent("good");
    c.wait_agents(1).await;

    c.agent_token = Some("a-wrong-token-0123456789".into());
    let bad = c.start_agent("bad");
    wait_until("the impostor to be refused", Duration::from_secs(20), || async {
        c.agents[bad].log().contains("401").then_some(())
    })
    .await;
    assert_eq!(
        c.api.agents().await.unwrap().len(),
        1,
        "the impostor never registers"
    );

    let id = c.api.create(&sha).await.id;
    let b = c.api.wait_finished(id, Duration::from_secs(60)).await;
    assert_eq!(b.status, BuildStatus::Success);

    // The agent refuses builds from anyone without the token.
    let agent_url = c.api.agents().await.unwrap()[0].url.clone();
    let resp = reqwest::Client::new()
        .post(format!("{agent_url}/build"))
        .json(&serde_json::json!({"id": 99, "command": "touch /tmp/pwned", "hash": "abcd", "repo": "/r"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 401);
}
