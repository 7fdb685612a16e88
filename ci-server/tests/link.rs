//! `HttpLink` against a small warp stub of an agent, for each way an agent
//! can answer `POST /build`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic

use std::time::Duration;

use ci_core::{
    AgentId, AgentLink, Attempt, Build, BuildId, CommitRef, Dispatch, DispatchFailure, DispatchId, NewBuild,
    RepoUrl, Step, StepId, StepStatus, Timestamp,
};
use ci_server::HttpLink;
use warp::http::StatusCode;
use warp::Filter;

/// An agent answering every `POST /build` with `status`.
async fn stub(status: StatusCode) -> String {
    let route = warp::path!("build").and(warp::post()).map(move || {
        let body = warp::reply::json(&serde_json::json!({"error": format!("stub says {status}")}));
        warp::reply::with_status(body, status)
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(warp::serve(route).incoming(listener).run());
    url
}

fn dispatch(agent_url: String) -> Dispatch {
    let repo = RepoUrl::parse("/srv/repo").unwrap();
    let new = NewBuild::new(repo, CommitRef::parse("abcd").unwrap(), "make").unwrap();
    let build = Build::new(BuildId(1), &new, Timestamp(0));
    let step = Step {
        status: StepStatus::Running,
        attempt: Attempt(1),
        agent_id: Some(AgentId(1)),
        ..Step::new(StepId(1), &build, &new.plan()[0])
    };
    Dispatch {
        agent: AgentId(1),
        agent_url,
        id: DispatchId::new(step.id, step.attempt).unwrap(),
        step,
    }
}

#[tokio::test]
async fn each_answer_means_what_it_says() {
    let link = HttpLink::new(Duration::from_secs(5), None).unwrap();
    let cases = [
        (StatusCode::OK, "ok"),
        (StatusCode::CONFLICT, "busy"),
        (StatusCode::BAD_REQUEST, "rejected"),
        (StatusCode::PAYLOAD_TOO_LARGE, "rejected"),
        (StatusCode::UNAUTHORIZED, "unreachable"),
        (StatusCode::FORBIDDEN, "unreachable"),
        (StatusCode::NOT_FOUND, "unreachable"),
        (StatusCode::TEMPORARY_REDIRECT, "unreachable"),
        (StatusCode::INTERNAL_SERVER_ERROR, "unreachable"),
        (StatusCode::SERVICE_UNAVAILABLE, "unreachable"),
    ];
    for (status, expected) in cases {
        let got = match link.dispatch(&dispatch(stub(status).await)).await {
            Ok(()) => "ok",
            Err(DispatchFailure::Busy(why)) => {
                assert!(why.contains("stub says"), "{why}");
                "busy"
            }
            Err(DispatchFailure::Rejected(why)) => {
                assert!(why.contains("stub says"), "{why}");
                "rejected"
            }
            Err(DispatchFailure::Unreachable(_)) => "unreachable",
        };
        assert_eq!(got, expected, "an agent answering {status}");
    }
    // Nobody listening.
    let port = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let refused = link.dispatch(&dispatch(format!("http://127.0.0.1:{port}"))).await;
    assert!(
        matches!(refused, Err(DispatchFailure::Unreachable(_))),
        "{refused:?}"
    );
}
