//! The command line.

/// What to measure.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "ci-bench",
    version,
    about = "Benchmark a real ci-server and agents over loopback"
)]
pub struct Opts {
    /// Agents.
    #[arg(long, default_value_t = 16, value_parser = at_least_one)]
    pub agents: usize,
    /// Builds in the throughput phase.
    #[arg(long, default_value_t = 5000, value_parser = at_least_one)]
    pub builds: usize,
    /// Concurrent submitters in the throughput phase.
    #[arg(long, default_value_t = 64, value_parser = at_least_one)]
    pub concurrency: usize,
    /// Real `ci-agent` processes with the shell runner, building `true`.
    #[arg(long)]
    pub shell: bool,
    /// Instead: this many builds one at a time, submit to finished.
    #[arg(long, default_value_t = 0)]
    pub lone: usize,
    /// Instead: dead-agent detection and requeue (heartbeat 100 ms, 3 missed).
    #[arg(long)]
    pub failover: bool,
    /// Instead: this many times, a real `ci-agent` that connects out is
    /// SIGKILLed mid-build: how soon its build runs again on another.
    #[arg(long)]
    pub kill: Option<usize>,
    /// Instead: pipelines of no-op steps read from a `.ci.yml`, five in a
    /// row (`linear`) or 100 at once and a final one (`fan`).
    #[arg(long, value_enum)]
    pub pipeline: Option<crate::pipeline::Shape>,
    /// Instead: this many queued steps and `--agents` agents with different
    /// labels, the coordinator on SQLite in this process: how long a
    /// scheduling pass takes.
    #[arg(long)]
    pub queue: Option<usize>,
    /// With `--queue`: how many passes to time.
    #[arg(long, default_value_t = 2000)]
    pub passes: usize,
    /// With `--pipeline`: how many (default 500 linear, 30 fan).
    #[arg(long, value_parser = at_least_one)]
    pub pipelines: Option<usize>,
    /// Waiting submitters in the latency phase (default: half the agents).
    #[arg(long, value_parser = at_least_one)]
    pub submitters: Option<usize>,
    /// Instead of waiting submitters: builds arriving at this many per
    /// second, independently of each other (Poisson), whatever the
    /// server's pace (open loop).
    #[arg(long, value_parser = positive_rate)]
    pub rate: Option<f64>,
    /// Instead: this many pushes, each delivered as a signed webhook:
    /// delivery to the step running.
    #[arg(long)]
    pub hooks: Option<usize>,
    /// Instead: this many projects polled every `--poll-interval` seconds:
    /// the server's CPU and git processes over one interval.
    #[arg(long)]
    pub poll_projects: Option<usize>,
    /// Instead: this many simulated agents connected at once over real
    /// WebSockets, pinging every second: the server's memory and CPU,
    /// then dispatch latency over `--builds` builds one at a time (at most
    /// 1,000).
    #[arg(long)]
    pub fleet: Option<usize>,
    /// With `--poll-projects`.
    #[arg(long, default_value_t = 60)]
    pub poll_interval: u32,
    /// With waiting submitters: a pause between a build's completion and
    /// the submitter's next build (lets the machine go idle between builds).
    #[arg(long, default_value_t = 0)]
    pub pause_ms: u64,
}

impl Opts {
    /// Waiting submitters in the latency phase.
    pub fn submitters(&self) -> usize {
        self.submitters.unwrap_or((self.agents / 2).max(1))
    }

    /// `shell` or `no-op`.
    pub fn mode(&self) -> &'static str {
        if self.shell {
            "shell"
        } else {
            "no-op"
        }
    }
}

fn at_least_one(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err(format!("{s:?} is not a whole number of at least 1")),
    }
}

fn positive_rate(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(r) if r.is_finite() && r > 0.0 => Ok(r),
        _ => Err(format!("{s:?} is not a positive number of builds per second")),
    }
}
