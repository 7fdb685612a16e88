//! `/metrics` in the Prometheus text format: counts read from the store and
//! the pool at scrape time, and histograms and counters fed by the
//! coordinator's events.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

use ci_core::coordinator::{Event, LeaveReason};
use ci_core::BuildStatus;

/// A cumulative histogram with fixed bucket bounds (in seconds).
#[derive(Debug)]
struct Histogram {
    bounds: &'static [f64],
    buckets: Vec<AtomicU64>,
    sum_ms: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Histogram {
        Histogram {
            bounds,
            buckets: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            sum_ms: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }

    fn observe_ms(&self, ms: u64) {
        let secs = ms as f64 / 1000.0;
        for (b, bound) in self.buckets.iter().zip(self.bounds) {
            if secs <= *bound {
                b.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.sum_ms.fetch_add(ms, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (b, bound) in self.buckets.iter().zip(self.bounds) {
            let _ = writeln!(
                out,
                "{name}_bucket{{le=\"{bound}\"}} {}",
                b.load(Ordering::Relaxed)
            );
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let sum = self.sum_ms.load(Ordering::Relaxed) as f64 / 1000.0;
        let _ = writeln!(out, "{name}_sum {sum}\n{name}_count {count}");
    }
}

/// Builds per status.
type Counts = Vec<(BuildStatus, u64)>;

/// The server's metrics. See the [module docs](self).
#[derive(Debug)]
pub struct Metrics {
    /// Builds per status, counted at most every [`COUNTS_TTL`]: the count
    /// scans an index as long as the history, which is not worth doing on
    /// every scrape nor worth a trigger on every write.
    counts: std::sync::Mutex<Option<(tokio::time::Instant, Counts)>>,
    dispatch_latency: Histogram,
    build_duration: Histogram,
    heartbeat_misses: AtomicU64,
    requeues: AtomicU64,
    dispatches: AtomicU64,
    agents_dropped: [AtomicU64; 6],
    lagged: AtomicU64,
}

const LEAVE_REASONS: [(LeaveReason, &str); 6] = [
    (LeaveReason::Unreachable, "unreachable"),
    (LeaveReason::MissedHeartbeats, "missed_heartbeats"),
    (LeaveReason::Silent, "silent"),
    (LeaveReason::Replaced, "replaced"),
    (LeaveReason::Left, "left"),
    (LeaveReason::Disconnected, "disconnected"),
];

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            counts: std::sync::Mutex::new(None),
            dispatch_latency: Histogram::new(&[
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                60.0, 300.0,
            ]),
            build_duration: Histogram::new(&[
                0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 600.0, 1800.0, 3600.0,
            ]),
            heartbeat_misses: AtomicU64::new(0),
            requeues: AtomicU64::new(0),
            dispatches: AtomicU64::new(0),
            agents_dropped: Default::default(),
            lagged: AtomicU64::new(0),
        }
    }
}

/// What is read at scrape time.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// Builds per status.
    pub builds: Vec<(BuildStatus, u64)>,
    /// Idle agents.
    pub idle: u64,
    /// Busy agents.
    pub busy: u64,
    /// Agents' connections open (agents that connect out).
    pub connections: u64,
}

/// How long a count of builds per status is reused.
pub const COUNTS_TTL: std::time::Duration = std::time::Duration::from_secs(5);

impl Metrics {
    /// Builds per status, from `count` at most every [`COUNTS_TTL`].
    pub async fn build_counts<E, F, Fut>(&self, count: F) -> Result<Counts, E>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<Counts, E>>,
    {
        {
            let cached = self
                .counts
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Some((at, counts)) = cached.as_ref() {
                if at.elapsed() < COUNTS_TTL {
                    return Ok(counts.clone());
                }
            }
        }
        let fresh = count().await?;
        *self
            .counts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) =
            Some((tokio::time::Instant::now(), fresh.clone()));
        Ok(fresh)
    }

    /// Counts an event.
    pub fn observe(&self, e: &Event) {
        match e {
            Event::Started { waited_ms, .. } => {
                self.dispatches.fetch_add(1, Ordering::Relaxed);
                self.dispatch_latency.observe_ms(*waited_ms);
            }
            Event::Finished {
                duration_ms: Some(ms),
                ..
            } => self.build_duration.observe_ms(*ms),
            Event::Requeued { .. } => {
                self.requeues.fetch_add(1, Ordering::Relaxed);
            }
            Event::AgentLeft { reason, .. } => {
                if *reason == LeaveReason::MissedHeartbeats {
                    self.heartbeat_misses.fetch_add(1, Ordering::Relaxed);
                }
                if let Some(i) = LEAVE_REASONS.iter().position(|(r, _)| r == reason) {
                    self.agents_dropped[i].fetch_add(1, Ordering::Relaxed);
                }
            }
            _ => {}
        }
    }

    /// Counts events the metrics task missed (it fell behind).
    pub fn lagged(&self, n: u64) {
        self.lagged.fetch_add(n, Ordering::Relaxed);
    }

    /// The exposition text.
    pub fn render(&self, now: &Snapshot) -> String {
        let mut out = String::with_capacity(4096);
        let _ = writeln!(out, "# HELP ci_builds Builds by status.\n# TYPE ci_builds gauge");
        for (status, n) in &now.builds {
            let _ = writeln!(out, "ci_builds{{status=\"{status}\"}} {n}");
        }
        let queued = now
            .builds
            .iter()
            .find(|(s, _)| *s == BuildStatus::Queued)
            .map_or(0, |(_, n)| *n);
        let _ = writeln!(
            out,
            "# HELP ci_queue_depth Builds waiting for an agent.\n# TYPE ci_queue_depth gauge\nci_queue_depth {queued}"
        );
        let _ = writeln!(
            out,
            "# HELP ci_agents Registered agents by state.\n# TYPE ci_agents gauge\nci_agents{{state=\"idle\"}} {}\nci_agents{{state=\"busy\"}} {}",
            now.idle, now.busy
        );
        let _ = writeln!(
            out,
            "# HELP ci_agent_connections Open connections of agents that connect to the server.
# TYPE ci_agent_connections gauge
ci_agent_connections {}",
            now.connections
        );
        self.dispatch_latency.render(
            &mut out,
            "ci_dispatch_latency_seconds",
            "Time from queued (or requeued) to dispatched.",
        );
        self.build_duration.render(
            &mut out,
            "ci_build_duration_seconds",
            "Run time of finished builds.",
        );
        let counters = [
            ("ci_dispatches_total", "Attempts dispatched.", &self.dispatches),
            (
                "ci_heartbeat_misses_total",
                "Agents dropped for missing heartbeats mid-build.",
                &self.heartbeat_misses,
            ),
            (
                "ci_requeues_total",
                "Builds put back in the queue.",
                &self.requeues,
            ),
            (
                "ci_metrics_events_lagged_total",
                "Events the metrics missed.",
                &self.lagged,
            ),
        ];
        for (name, help, v) in counters {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                v.load(Ordering::Relaxed)
            );
        }
        let _ = writeln!(
            out,
            "# HELP ci_agents_dropped_total Agents dropped, by reason.\n# TYPE ci_agents_dropped_total counter"
        );
        for ((_, name), v) in LEAVE_REASONS.iter().zip(&self.agents_dropped) {
            let _ = writeln!(
                out,
                "ci_agents_dropped_total{{reason=\"{name}\"}} {}",
                v.load(Ordering::Relaxed)
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ci_core::{AgentId, Attempt, BuildId, StepId};

    #[test]
    fn renders_counts_histograms_and_counters() {
        let m = Metrics::default();
        m.observe(&Event::Started {
            step: StepId(1),
            build: BuildId(1),
            attempt: Attempt(1),
            agent: AgentId(1),
            waited_ms: 3,
        });
        m.observe(&Event::Finished {
            build: BuildId(1),
            status: BuildStatus::Success,
            duration_ms: Some(1500),
        });
        m.observe(&Event::AgentLeft {
            agent: AgentId(1),
            reason: LeaveReason::MissedHeartbeats,
        });
        m.observe(&Event::Requeued {
            step: StepId(1),
            attempt: Attempt(1),
        });
        let text = m.render(&Snapshot {
            builds: vec![(BuildStatus::Queued, 4), (BuildStatus::Success, 1)],
            idle: 2,
            busy: 1,
            connections: 3,
        });
        for line in [
            "ci_builds{status=\"queued\"} 4",
            "ci_queue_depth 4",
            "ci_agents{state=\"busy\"} 1",
            "ci_agent_connections 3",
            "ci_dispatch_latency_seconds_bucket{le=\"0.0025\"} 0",
            "ci_dispatch_latency_seconds_bucket{le=\"0.005\"} 1",
            "ci_dispatch_latency_seconds_count 1",
            "ci_build_duration_seconds_bucket{le=\"1\"} 0",
            "ci_build_duration_seconds_bucket{le=\"5\"} 1",
            "ci_build_duration_seconds_sum 1.5",
            "ci_heartbeat_misses_total 1",
            "ci_requeues_total 1",
            "ci_agents_dropped_total{reason=\"missed_heartbeats\"} 1",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
    }
}
