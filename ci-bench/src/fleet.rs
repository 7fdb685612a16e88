//! Many agents connected at once: `n` simulated agents, each a real
//! WebSocket on loopback (`GET /agent/connect`) that registers, pings once
//! a second while idle, and takes builds, against a real server. Reports
//! the server's memory, the CPU its heartbeat handling costs, dispatch
//! latency with that many agents, and how fast a killed agent's build
//! moves.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ci_core::protocol::{Frame, NotifyAgentReply, CONNECT_PATH};
use futures_util::{SinkExt, StreamExt};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

use crate::setup::Bench;
use crate::stats::{ms, pct, rss_kib, sorted, spread, usage};
use crate::Error;

/// How long heartbeats are measured.
const STEADY: Duration = Duration::from_secs(20);

/// When each build (by number) reached its agent.
#[derive(Default)]
struct Arrivals {
    at: Mutex<HashMap<i64, Instant>>,
    registered: AtomicUsize,
    /// The first agent that failed, and why.
    failed: Mutex<Option<String>>,
    /// Registrations tried again.
    retries: AtomicUsize,
}

/// Raises the open-file limit to what `n` agents need at each end (this
/// process holds their sockets, and the server, a child that inherits the
/// limit, theirs), and says what it raised.
pub(crate) fn raise_fd_limit(n: usize) -> Result<(), Error> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).map_err(|e| Error::Setup(e.to_string()))?;
    let want = n as u64 + 1024;
    if want <= soft {
        return Ok(());
    }
    // N.B.: past the hard limit only with CAP_SYS_RESOURCE, up to the
    // kernel's fs.nr_open.
    let raised_hard = want > hard && setrlimit(Resource::RLIMIT_NOFILE, want, want).is_ok();
    if raised_hard {
        println!("  open-file limit raised from {soft} to {want} (hard limit raised from {hard})");
        return Ok(());
    }
    let got = want.min(hard);
    setrlimit(Resource::RLIMIT_NOFILE, got, hard).map_err(|e| Error::Setup(e.to_string()))?;
    println!("  open-file limit raised from {soft} to {got} (hard limit {hard})");
    if got < n as u64 + 64 {
        return Err(Error::Setup(format!(
            "{n} agents need about {} open files per process; the hard limit is {hard}, \
             and raising it needs CAP_SYS_RESOURCE",
            n + 64
        )));
    }
    Ok(())
}

/// Connections one source address can open to one server port: the
/// kernel's ephemeral ports (32768-60999 by default), with room to spare.
const PER_SOURCE: usize = 20_000;

/// The loopback address simulated agent `i` connects from: past
/// [`PER_SOURCE`] agents, one address cannot hold them all.
fn source(i: usize) -> std::net::SocketAddr {
    let n = u8::try_from(2 + i / PER_SOURCE).unwrap_or(u8::MAX);
    std::net::SocketAddr::from(([127, 0, 0, n], 0))
}

/// Runs the fleet of `n` agents, then `builds` builds one at a time.
pub(crate) async fn run(b: &Bench, n: usize, builds: usize) -> Result<(), Error> {
    let url = format!("ws://127.0.0.1:{}{CONNECT_PATH}", b.port);
    let arrivals = Arc::new(Arrivals::default());
    let pid = b.server_pid();
    let rss_before = rss_kib(pid);
    let t = Instant::now();
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        let (url, arrivals) = (url.clone(), arrivals.clone());
        tasks.push(tokio::spawn(async move {
            if let Err(e) = agent(url, i, arrivals.clone()).await {
                if let Ok(mut first) = arrivals.failed.lock() {
                    first.get_or_insert(format!("agent {i}: {e}"));
                }
            }
        }));
        // N.B.: a few hundred at a time, as a fleet starting up would.
        if i % 200 == 199 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while arrivals.registered.load(Ordering::Relaxed) < n {
        let failed = arrivals.failed.lock().ok().and_then(|f| f.clone());
        if let Some(e) = failed {
            return Err(Error::Setup(format!(
                "{} of {n} agents registered, then one failed: {e}\nthe server's last words:\n{}",
                arrivals.registered.load(Ordering::Relaxed),
                b.server_log_tail(10)
            )));
        }
        if Instant::now() > deadline {
            return Err(Error::Timeout(format!(
                "only {} of {n} agents registered in 120 s",
                arrivals.registered.load(Ordering::Relaxed)
            )));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!(
        "  {n} agents connected and registered in {:.1} s ({} tried again)",
        t.elapsed().as_secs_f64(),
        arrivals.retries.load(Ordering::Relaxed)
    );

    // Steady state: every agent pings once a second.
    let (cpu0, _) = usage(pid);
    tokio::time::sleep(STEADY).await;
    let (cpu1, _) = usage(pid);
    let rss = rss_kib(pid);
    let share = (cpu1 - cpu0) / STEADY.as_secs_f64();
    println!(
        "  server RSS {:.1} MiB with {n} agents connected ({:.1} MiB before; {:.1} KiB per agent)",
        rss as f64 / 1024.0,
        rss_before as f64 / 1024.0,
        (rss.saturating_sub(rss_before)) as f64 / n as f64
    );
    println!(
        "  heartbeats: {n}/s cost the server {:.1}% of one core ({:.1} us each)",
        share * 100.0,
        share * 1e6 / n as f64
    );

    // Dispatch with that many agents: one build at a time.
    let mut lat = Vec::with_capacity(builds);
    for _ in 0..builds {
        let sent = Instant::now();
        let id = b.submit("true").await?;
        let arrived = loop {
            if let Some(at) = arrivals
                .at
                .lock()
                .map_err(|_| Error::Setup("poisoned".into()))?
                .remove(&id)
            {
                break at;
            }
            if sent.elapsed() > Duration::from_secs(30) {
                return Err(Error::Timeout(format!("build {id} never reached an agent")));
            }
            tokio::time::sleep(Duration::from_micros(200)).await;
        };
        lat.push(ms(arrived.saturating_duration_since(sent)));
    }
    let v = sorted(lat);
    println!(
        "  dispatch with {n} agents: {}  ({} builds, one at a time)",
        spread(&v),
        v.len()
    );
    println!(
        "{}",
        serde_json::json!({
            "mode": "fleet", "agents": n, "server_rss_mib": rss as f64 / 1024.0,
            "heartbeat_core_share": share, "dispatch_ms": {"p50": pct(&v, 0.5), "p99": pct(&v, 0.99)},
        })
    );
    for t in tasks {
        t.abort();
    }
    Ok(())
}

type Socket = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

/// Connects simulated agent `i` and registers it.
async fn register(url: &str, i: usize) -> Result<(Socket, NotifyAgentReply), String> {
    let socket = tokio::net::TcpSocket::new_v4().map_err(|e| e.to_string())?;
    socket
        .bind(source(i))
        .map_err(|e| format!("bind {}: {e}", source(i)))?;
    let port = url
        .split(':')
        .nth(2)
        .and_then(|p| p.split('/').next()?.parse::<u16>().ok())
        .ok_or("no port in the URL")?;
    let stream = socket
        .connect(std::net::SocketAddr::from(([127, 0, 0, 1], port)))
        .await
        .map_err(|e| e.to_string())?;
    stream.set_nodelay(true).map_err(|e| e.to_string())?;
    let (mut ws, _) = tokio_tungstenite::client_async(url, stream)
        .await
        .map_err(|e| e.to_string())?;
    let hello = Frame::Request {
        id: 1,
        path: "/notify_agent".into(),
        session: None,
        body: serde_json::json!({"session": true, "pings": true, "name": format!("bench-{i}")}),
        quiet: false,
    };
    let text = serde_json::to_string(&hello).map_err(|e| e.to_string())?;
    ws.send(Message::text(text)).await.map_err(|e| e.to_string())?;
    loop {
        let m = ws.next().await.ok_or("closed")?.map_err(|e| e.to_string())?;
        if let Ok(Frame::Response { id: 1, body, .. }) =
            serde_json::from_str::<Frame>(m.to_text().unwrap_or(""))
        {
            let reply = serde_json::from_value(body).map_err(|e| e.to_string())?;
            return Ok((ws, reply));
        }
    }
}

/// One simulated agent: connects, registers (trying again after a
/// failure, as `ci-agent` does), pings every second while idle, takes
/// each build, records when it arrived and reports success.
async fn agent(url: String, i: usize, arrivals: Arc<Arrivals>) -> Result<(), String> {
    let mut tries = 0u64;
    let (ws, reply) = loop {
        match register(&url, i).await {
            Ok(r) => break r,
            Err(e) if tries == 10 => return Err(e),
            Err(e) => {
                tries += 1;
                if arrivals.retries.fetch_add(1, Ordering::Relaxed) == 0 {
                    println!("  agent {i} could not register ({e}); it tries again, as ci-agent does");
                }
                let pause = 100 * tries + fastrand::u64(..100 * tries);
                tokio::time::sleep(Duration::from_millis(pause)).await;
            }
        }
    };
    let (mut sink, mut stream) = ws.split();
    let send = |frame: &Frame| {
        serde_json::to_string(frame)
            .map(Message::text)
            .map_err(|e| e.to_string())
    };
    arrivals.registered.fetch_add(1, Ordering::Relaxed);
    let mut next = 2u64;
    // Spread over the second, as a real fleet's pings are.
    let offset = Duration::from_millis(fastrand::u64(..1000));
    let mut tick = tokio::time::interval_at(Instant::now() + offset, Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = tick.tick() => {
                next += 1;
                let ping = Frame::Request {
                    id: next,
                    path: "/notify_agent_alive".into(),
                    session: reply.secret.clone(),
                    body: serde_json::json!({"agentId": reply.id}),
                    // As `ci-agent`'s idle pings: answered only if refused.
                    quiet: true,
                };
                sink.send(send(&ping)?).await.map_err(|e| e.to_string())?;
            }
            m = stream.next() => {
                let m = m.ok_or("closed")?.map_err(|e| e.to_string())?;
                let Ok(Frame::Request { id, path, body, .. }) = serde_json::from_str::<Frame>(m.to_text().unwrap_or("")) else {
                    continue;
                };
                if path != "/build" {
                    continue;
                }
                if let Some(build) = body["build"].as_i64() {
                    if let Ok(mut at) = arrivals.at.lock() {
                        at.insert(build, Instant::now());
                    }
                }
                let ok = Frame::Response { id, status: 200, body: serde_json::json!({"accepted": true}) };
                sink.send(send(&ok)?).await.map_err(|e| e.to_string())?;
                next += 1;
                let result = Frame::Request {
                    id: next,
                    path: "/notify_build_result".into(),
                    session: reply.secret.clone(),
                    body: serde_json::json!({
                        "id": body["id"], "status": 0, "stdout": "", "stderr": "",
                        "attempt": body["attempt"], "agentId": reply.id,
                    }),
                    quiet: false,
                };
                sink.send(send(&result)?).await.map_err(|e| e.to_string())?;
            }
        }
    }
}
