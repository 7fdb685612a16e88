//! Hostile load against real processes: floods of log pieces, builds that
//! print hundreds of megabytes, many readers of a large log, and idle
//! sockets. Memory is read from `/proc`; the tests run one at a time, so
//! each has the machine to itself.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic

mod common;

use std::time::Duration;

use ci_core::BuildStatus;
use common::{memory_kib, reset_peak_memory, wait_until, Cluster, FakeAgent};
use serde_json::{json, Value};
use tokio::sync::Mutex;

const LONG: Duration = Duration::from_secs(120);
const MIB: u64 = 1024;

/// One test at a time.
static ALONE: Mutex<()> = Mutex::const_new(());

#[tokio::test]
async fn fifty_thousand_log_pieces_leave_the_server_responsive() {
    let _alone = ALONE.lock().await;
    let mut c = Cluster::new(1000, 30);
    let sha = c.commit_script("true");
    c.start_server();
    c.wait_server().await;
    let agent = FakeAgent::start(&c.api, None, true).await;
    let id = c.api.create(&sha).await.id;
    // N.B.: the wire id of the dispatch names its attempt.
    let wire = wait_until("the dispatch", LONG, || async {
        agent.builds.lock().unwrap().first().map(|d| d["id"].clone())
    })
    .await;
    // Alternating streams, so no two pieces can be joined.
    let pieces: Vec<Value> = (0..50_000u64)
        .map(|seq| {
            let stream = if seq % 2 == 0 { "stdout" } else { "stderr" };
            json!({"seq": seq, "stream": stream, "data": "x"})
        })
        .collect();
    let body = json!({"id": wire, "attempt": 1, "agentId": agent.id, "pieces": pieces});
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let probe = {
        let (http, url, stop) = (c.api.http.clone(), c.api.url("/healthz"), stop.clone());
        tokio::spawn(async move {
            let mut worst = Duration::ZERO;
            let mut samples = 0;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let t = tokio::time::Instant::now();
                http.get(&url).send().await.unwrap();
                worst = worst.max(t.elapsed());
                samples += 1;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            (worst, samples)
        })
    };
    let sent = tokio::time::Instant::now();
    let (status, reply) = agent.post(&c.api, None, true, "/notify_build_log", &body).await;
    let took = sent.elapsed();
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let (worst, samples) = probe.await.unwrap();
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["stored"], 50_000);
    eprintln!("50,000 pieces stored in {took:?}; /healthz worst {worst:?} over {samples} probes");
    assert!(samples > 0);
    assert!(
        worst < Duration::from_millis(50),
        "/healthz took {worst:?} while the pieces were stored"
    );
    let log = c.api.log(id).await.unwrap();
    assert_eq!(log["stdout"].as_str().unwrap().len(), 25_000);
    assert_eq!(log["stderr"].as_str().unwrap().len(), 25_000);
}

#[tokio::test]
async fn a_build_printing_300_mb_keeps_the_agent_small() {
    let _alone = ALONE.lock().await;
    let mut c = Cluster::new(300, 10);
    let sha = c.commit_script("head -c 300000000 /dev/zero | tr '\\0' a; echo done >&2");
    c.start_server();
    let a = c.start_agent("a");
    c.wait_agents(1).await;
    let agent = c.agents[a].pid();
    let idle = memory_kib(agent, "VmRSS");
    let id = c.api.create(&sha).await.id;
    let b = c.api.wait_finished(id, LONG).await;
    assert_eq!(b.status, BuildStatus::Success);
    let peak = memory_kib(agent, "VmHWM");
    eprintln!("agent: {idle} KiB idle, {peak} KiB at its peak");
    // It keeps 16 MiB of the output and sends it once; it used to keep all
    // 300 MB queued for the live log.
    assert!(
        peak < idle + 96 * MIB,
        "the agent peaked at {peak} KiB (idle {idle} KiB)"
    );
    let log = c.api.log(id).await.unwrap();
    let out = log["stdout"].as_str().unwrap();
    assert!(out.len() <= ci_core::model::limits::MAX_LOG, "{}", out.len());
    let marker = out.rsplit("[output truncated: ").next().unwrap();
    let omitted: u64 = marker.split(' ').next().unwrap().parse().unwrap();
    let kept = out.len() as u64;
    assert!(
        (300_000_000 - kept..=300_000_000).contains(&omitted),
        "the marker says {omitted} bytes omitted of 300,000,000 with {kept} kept"
    );
    assert_eq!(log["stderr"], "done\n");
}

#[tokio::test]
async fn forty_readers_of_a_16_mib_log_keep_the_server_small() {
    let _alone = ALONE.lock().await;
    let mut c = Cluster::new(300, 10);
    let sha = c.commit_script("head -c 16000000 /dev/zero | tr '\\0' b");
    c.start_server();
    c.start_agent("a");
    c.wait_agents(1).await;
    let id = c.api.create(&sha).await.id;
    assert_eq!(c.api.wait_finished(id, LONG).await.status, BuildStatus::Success);
    let server = c.server.as_ref().unwrap().pid();
    let before = memory_kib(server, "VmRSS");
    reset_peak_memory(server);
    let mut readers = tokio::task::JoinSet::new();
    for i in 0..40 {
        let http = c.api.http.clone();
        let path = if i % 2 == 0 {
            format!("/api/builds/{id}/log")
        } else {
            format!("/builds/{id}")
        };
        let url = c.api.url(&path);
        readers.spawn(async move {
            let r = http.get(url).timeout(LONG).send().await.unwrap();
            assert!(r.status().is_success());
            (i % 2 == 0, r.bytes().await.unwrap())
        });
    }
    while let Some(done) = readers.join_next().await {
        let (json, body) = done.unwrap();
        if json {
            let v: Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(
                v["stdout"].as_str().unwrap().len() as u64,
                16_000_000 + first_line(&v)
            );
            assert_eq!(v["complete"], true);
        } else {
            assert!(body.len() > 16_000_000, "the page carries the log");
        }
    }
    let peak = memory_kib(server, "VmHWM");
    eprintln!("server: {before} KiB before, {peak} KiB at its peak during 40 reads");
    assert!(
        peak < before + 64 * MIB,
        "forty readers took the server from {before} to {peak} KiB"
    );
}

/// Length of the `ci: checked out ...` line the agent puts first.
fn first_line(log: &Value) -> u64 {
    let out = log["stdout"].as_str().unwrap();
    out.find('\n').map_or(0, |i| i as u64 + 1)
}

#[tokio::test]
async fn idle_sockets_cannot_take_every_descriptor() {
    let _alone = ALONE.lock().await;
    let mut c = Cluster::new(300, 10);
    c.server_fds = Some(256);
    c.server_env.push(("HEADER_TIMEOUT".into(), "2s".into()));
    c.start_server();
    c.wait_server().await;
    let mut idle = Vec::new();
    for _ in 0..300 {
        idle.push(
            tokio::net::TcpStream::connect(("127.0.0.1", c.port))
                .await
                .unwrap(),
        );
    }
    let server = c.server.as_ref().unwrap();
    wait_until("the limit to be logged", LONG, || async {
        server.log().contains("connection limit reached").then_some(())
    })
    .await;
    // The idle ones are closed after the header timeout; the server then
    // answers again, with all 300 still open on this side.
    let mut closed = 0;
    for s in &mut idle {
        let mut buf = [0u8; 1];
        let read = tokio::time::timeout(
            Duration::from_secs(10),
            tokio::io::AsyncReadExt::read(s, &mut buf),
        )
        .await;
        if matches!(read, Ok(Ok(0)) | Ok(Err(_))) {
            closed += 1;
        }
    }
    assert_eq!(closed, 300, "every idle connection is closed");
    wait_until("the server to answer", Duration::from_secs(10), || async {
        c.api
            .http
            .get(c.api.url("/healthz"))
            .send()
            .await
            .ok()
            .filter(|r| r.status().is_success())
    })
    .await;
    assert!(
        c.server.as_mut().unwrap().try_wait().is_none(),
        "the server is still up"
    );
}
