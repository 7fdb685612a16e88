//! The agent connection's frames against a real server on 127.0.0.1: a
//! quiet request is answered only when it fails; every other request is
//! answered, in order.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic

use std::time::Duration;

use ci_core::protocol::{Frame, CONNECT_PATH};
use ci_core::RepoUrl;
use ci_server::{Server, ServerConfig};
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

type Socket = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn send(ws: &mut Socket, id: u64, path: &str, body: serde_json::Value, quiet: bool) {
    let frame = Frame::Request {
        id,
        path: path.into(),
        session: None,
        body,
        quiet,
    };
    ws.send(Message::text(serde_json::to_string(&frame).unwrap()))
        .await
        .unwrap();
}

/// The next response: (id, status).
async fn response(ws: &mut Socket) -> (u64, u16) {
    let next = tokio::time::timeout(Duration::from_secs(10), ws.next()).await;
    let message = next.expect("an answer in 10 s").unwrap().unwrap();
    match serde_json::from_str::<Frame>(message.to_text().unwrap()).unwrap() {
        Frame::Response { id, status, .. } => (id, status),
        other => panic!("not a response: {other:?}"),
    }
}

#[tokio::test]
async fn quiet_requests_are_answered_only_when_they_fail() {
    let dir = tempfile::tempdir().unwrap();
    let config = ServerConfig::new(RepoUrl::parse("/srv/repo").unwrap(), dir.path().join("ci.sqlite"));
    let server = Server::open(config).await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(server.serve(listener, async {
        let _ = stopped.await;
    }));

    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://127.0.0.1:{port}{CONNECT_PATH}"))
        .await
        .unwrap();
    let hello = json!({"session": true, "pings": true, "name": "quiet-one"});
    send(&mut ws, 1, "/notify_agent", hello, false).await;
    assert_eq!(response(&mut ws).await, (1, 200));

    // Requests over one connection are answered in order: had the quiet
    // ping been answered, its answer would come first.
    send(&mut ws, 2, "/notify_agent_alive", json!({"agentId": 1}), true).await;
    send(&mut ws, 3, "/notify_agent_alive", json!({"agentId": 1}), false).await;
    assert_eq!(response(&mut ws).await, (3, 200));

    // A quiet ping the server refuses (an agent it does not know) is
    // answered with the refusal.
    send(&mut ws, 4, "/notify_agent_alive", json!({"agentId": 99}), true).await;
    let (id, status) = response(&mut ws).await;
    assert_eq!(id, 4);
    assert!((400..500).contains(&status), "{status}");

    let _ = stop.send(());
    serving.await.unwrap().unwrap();
}
