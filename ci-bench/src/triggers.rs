//! Builds started by repositories: webhook delivery to a running step,
//! and what polling many projects costs the server.

use std::time::Duration;

use hmac::{Hmac, Mac};
use sha2::Sha256;
use tokio::time::Instant;

use crate::setup::Bench;
use crate::stats::{ms, pct, sorted};
use crate::{Error, Opts};

const SECRET: &str = "bench-webhook-secret";

/// `n` pushes, one at a time, each delivered as a signed GitHub push
/// webhook: from the delivery to the build's step running on an agent.
pub(crate) async fn hooks(b: &Bench, o: &Opts, n: usize) -> Result<(), Error> {
    let h = b.clone_handle();
    let set = h
        .http
        .patch(format!("{}/api/projects/default", b.base))
        .json(&serde_json::json!({ "webhookSecret": SECRET }))
        .send()
        .await?;
    if !set.status().is_success() {
        return Err(Error::Setup(format!(
            "PATCH the default project: {}",
            set.status()
        )));
    }
    let mut v = Vec::new();
    for i in 0..=n {
        let sha = b.commit(&[("pushed", &i.to_string())], &format!("push {i}"))?;
        let body = serde_json::to_vec(&serde_json::json!({
            "ref": "refs/heads/main", "after": sha,
            "repository": {"full_name": "bench/repo"},
            "head_commit": {"id": sha, "message": format!("push {i}"), "author": {"name": "b", "email": "b@b"}}
        }))
        .map_err(|e| Error::Setup(e.to_string()))?;
        let mut mac =
            Hmac::<Sha256>::new_from_slice(SECRET.as_bytes()).map_err(|e| Error::Setup(e.to_string()))?;
        mac.update(&body);
        let sig: String = mac
            .finalize()
            .into_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let t = Instant::now();
        let r: serde_json::Value = h
            .http
            .post(format!("{}/hooks/github?project=default", b.base))
            .header("content-type", "application/json")
            .header("x-github-event", "push")
            .header("x-github-delivery", format!("bench-{i}"))
            .header("x-hub-signature-256", format!("sha256={sig}"))
            .body(body)
            .send()
            .await?
            .json()
            .await?;
        let id = r["build"]
            .as_i64()
            .ok_or_else(|| Error::Setup(format!("the webhook started no build: {r}")))?;
        // Polled every millisecond: the figure is the server's.
        loop {
            let build: serde_json::Value = b.get(&format!("/api/builds/{id}")).await?;
            if build["status"].as_str().is_some_and(|s| s != "queued") {
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        if i > 0 {
            v.push(ms(t.elapsed()));
        }
    }
    let v = sorted(v);
    println!(
        "webhook push -> step running ({}, {} agent(s)): p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms (n={})",
        o.mode(),
        o.agents,
        pct(&v, 0.5),
        pct(&v, 0.99),
        v.last().copied().unwrap_or(f64::NAN),
        v.len()
    );
    Ok(())
}

/// CPU seconds of `pid` and of its waited-for children.
fn cpu_with_children(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat.rsplit(')').next().unwrap_or("").split_whitespace().collect();
    [11, 12, 13, 14]
        .iter()
        .filter_map(|i| fields.get(*i)?.parse::<f64>().ok())
        .sum::<f64>()
        / 100.0
}

/// The processes whose parent is `pid`.
fn children(pid: u32) -> usize {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0;
    };
    dir.filter_map(|e| e.ok())
        .filter_map(|e| std::fs::read_to_string(e.path().join("stat")).ok())
        .filter(|stat| {
            let fields: Vec<&str> = stat.rsplit(')').next().unwrap_or("").split_whitespace().collect();
            fields.get(1).and_then(|p| p.parse::<u32>().ok()) == Some(pid)
        })
        .count()
}

/// `n` projects polled every `every`: the server's CPU (its git
/// processes included) over one interval after the first look, and the
/// most git processes it ran at once.
pub(crate) async fn poll(b: &Bench, n: usize, every: u32) -> Result<(), Error> {
    let h = b.clone_handle();
    let repo = b.repo_path()?;
    for i in 0..n {
        let r = h
            .http
            .post(format!("{}/api/projects", b.base))
            .json(&serde_json::json!({"name": format!("p{i}"), "repo": repo, "pollInterval": every}))
            .send()
            .await?;
        if !r.status().is_success() {
            return Err(Error::Setup(format!("creating project {i}: {}", r.status())));
        }
    }
    // The first look at every project, then one whole interval measured.
    tokio::time::sleep(Duration::from_secs(u64::from(every) / 2 + 1)).await;
    let pid = b.server_pid();
    let (cpu0, t0) = (cpu_with_children(pid), Instant::now());
    let window = Duration::from_secs(u64::from(every));
    let mut most = 0;
    while t0.elapsed() < window {
        most = most.max(children(pid));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let cpu = cpu_with_children(pid) - cpu0;
    let secs = t0.elapsed().as_secs_f64();
    println!(
        "polling {n} projects every {every} s: server CPU (git included) {:.2} s per {:.0} s = {:.1}% of one core; at most {most} git processes at once",
        cpu,
        secs,
        100.0 * cpu / secs,
    );
    Ok(())
}
