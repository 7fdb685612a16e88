//! The benchmark harness: a real `ci-server` process (SQLite file on disk)
//! and K agents speaking the real protocol over loopback.
//!
//! ```text
//! cargo run --release -p ci-bench -- --agents 16 --builds 5000
//! cargo run --release -p ci-bench -- --agents 2 --builds 200 --shell        # real ci-agent processes, shell runner
//! cargo run --release -p ci-bench -- --lone 50 --shell                        # one build at a time
//! cargo run --release -p ci-bench -- --failover                               # dead-agent detection and requeue
//! cargo run --release -p ci-bench -- --kill 20                                # SIGKILL a connected agent mid-build
//! cargo run --release -p ci-bench -- --fleet 10000                            # 10,000 connected agents
//! cargo run --release -p ci-bench -- --pipeline linear                        # 5-step pipelines: next-step dispatch
//! cargo run --release -p ci-bench -- --pipeline fan                           # 100 parallel steps + 1: overhead
//! cargo run --release -p ci-bench -- --queue 100000 --agents 1000             # a scheduling pass, deep labelled queue
//! cargo run --release -p ci-bench -- --agents 16 --builds 1000 --submitters 1  # one build at a time
//! cargo run --release -p ci-bench -- --agents 16 --builds 5000 --rate 1000     # open-loop arrivals
//! ```
//!
//! No-op mode runs K agents in this process (`noop`): each answers `POST
//! /build` at once and reports success right away, so the figures are the
//! server's own cost. `--shell` starts K real `ci-agent` processes with the
//! shell runner building `true` in a small repository.
//!
//! Reported: throughput (first submit to last completion), dispatch latency
//! (submit sent to the agent holding the build), submit-to-complete latency
//! (submit sent to the result acknowledged), the server's CPU seconds and
//! peak RSS, the SQLite file per 1,000 builds, and the list endpoint's
//! latency on the first and on a deep page. A table, then one JSON line.
//!
//! # Layout
//! - [`Opts`]: the command line.
//! - `setup`: the binaries, the repository, the server and the shell agents.
//! - `noop`: in-process agents that take a build and report at once.
//! - `load`: submitting builds (closed loop or Poisson arrivals) and
//!   waiting for them.
//! - `throughput`, `lone`, `failover`, `pipeline`: the scenarios.
//! - `stats`: percentiles and what `/proc` says of the server.
//!
//! Until 2026-11-29 this was `examples/bench.rs`; the measurements are the
//! same code, moved, so figures from either compare.

#![allow(clippy::cast_precision_loss, clippy::cast_possible_truncation)] // figures

mod failover;
mod fleet;
mod load;
mod lone;
mod noop;
mod opts;
mod pipeline;
mod queue;
mod setup;
mod stats;
mod throughput;
mod triggers;

use std::sync::Arc;

pub use opts::Opts;

/// What stops a run.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A binary, a repository or the server could not be set up.
    #[error("{0}")]
    Setup(String),
    /// Something did not happen in time.
    #[error("{0}")]
    Timeout(String),
    /// A request failed.
    #[error("HTTP: {0}")]
    Http(#[from] reqwest::Error),
    /// A file or a process.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Runs the scenario `opts` asks for and prints its figures.
pub async fn run(opts: Opts) -> Result<(), Error> {
    if let Some(n) = opts.queue {
        return queue::run(&opts, n).await;
    }
    setup::build_binaries()?;
    if let Some(n) = opts.fleet {
        // N.B.: before the server starts: it inherits the limit.
        fleet::raise_fd_limit(n)?;
    }
    let (heartbeat_ms, missed) = if opts.failover {
        (failover::HEARTBEAT_MS, failover::MISSED_HEARTBEATS)
    } else {
        (1000, 5)
    };
    let mut bench = setup::Bench::start(heartbeat_ms, missed).await?;
    if opts.failover {
        return failover::run(&bench).await;
    }
    if let Some(rounds) = opts.kill {
        return failover::killed(&bench, rounds).await;
    }
    if let Some(shape) = opts.pipeline {
        return pipeline::run(&bench, &opts, shape).await;
    }
    if let Some(n) = opts.fleet {
        return fleet::run(&bench, n, opts.builds.min(1000)).await;
    }
    if let Some(n) = opts.poll_projects {
        return triggers::poll(&bench, n, opts.poll_interval).await;
    }
    if let Some(n) = opts.hooks {
        let _agents = bench.agents(&opts, &Arc::default()).await?;
        return triggers::hooks(&bench, &opts, n).await;
    }
    if opts.lone > 0 {
        let _agents = bench.agents(&opts, &Arc::default()).await?;
        return lone::run(&bench, &opts).await;
    }
    throughput::run(&mut bench, &opts).await
}
