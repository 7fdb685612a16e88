//! Deterministic simulation of the scheduler: the real `Coordinator`,
//! `MemoryStore`, pool and leases, driven by a seeded random schedule of
//! events on a virtual clock, with no I/O.
//!
//! Agents join, die, stall and recover; dispatches, heartbeats and results
//! are lost, delayed and duplicated; agents answer dispatches busy (409);
//! embedded workers, which heartbeat under their id but never ping while
//! idle, sit idle for long; the store fails now and then (a scheduling
//! pass's starts, results, heartbeats); builds are submitted, of one step
//! or of a random graph of steps (with labels, failures allowed and
//! retries); the server restarts from the store; users cancel builds and
//! retry finished ones. After every step the invariants are checked:
//! no agent holds more builds than its capacity; every lease is a running
//! attempt with a holder, and was dispatched (none is stranded by a failed
//! pass); no result or heartbeat of a superseded attempt is accepted; no
//! step waits while an agent is free after a scheduling pass; an embedded
//! worker is never forgotten; numbers only go up; a step never starts
//! before the steps it depends on passed; a build ends exactly when its
//! last step does.
//! At the end the faults stop and every submitted build must complete,
//! each step's attempt taken at most once.
//!
//! `SIM_SEEDS=n` runs n seeds (default 2000); `SIM_SEED=s` replays one.
//! A failure prints its seed.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ci_core::coordinator::{Accepted, Cancel, Dispatch, DispatchFailure, Heartbeat, Report, StopOrder};
use ci_core::store::{Builds, FaultyStore, Op, Queue};
use ci_core::{
    AgentId, Attempt, BuildId, BuildStatus, Clock, CommitRef, Completion, Coordinator, Enrollment, Error,
    Labels, LeasePolicy, ManualClock, MemoryStore, NewBuild, NewStep, RepoUrl, StepId, StepStatus, Stopped,
    Timestamp,
};

const INTERVAL_MS: u64 = 100;
const MISSED: u32 = 3;
const STEPS: usize = 300;

/// A message on its way, delivered at `at` unless lost.
#[derive(Clone, Debug)]
enum Msg {
    /// Server → agent.
    Dispatch(Box<Dispatch>),
    /// Agent → server.
    Heartbeat { from: usize, hb: Heartbeat },
    /// Agent → server.
    Result { from: usize, report: Report },
    /// Server → agent: stop this attempt.
    Stop(StopOrder),
    /// A stop order that did not get through: the server's request failed
    /// or timed out, and it hears so (it always does: the request ends).
    StopFailed(StopOrder),
}

#[derive(Clone, Debug, PartialEq)]
enum Health {
    Up,
    /// Frozen until the given time: sends and receives nothing.
    Stalled(u64),
    Dead,
}

/// How an agent speaks the protocol.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    /// Session secret, attempts, agentId: what `ci-agent` does in push mode.
    Secure,
    /// As `Secure`, over a connection it opened (`ci-agent`'s default): the
    /// server learns at once when the connection closes, and drops it.
    Connected,
    /// Attempts and a claimed agentId, no secret.
    Claims,
    /// Attempts only.
    Attempts,
    /// Only the original fields: no attempt, no agentId, no pings.
    Original,
    /// A `LocalCluster` worker: heartbeats under its id, proven, and never
    /// dies or stalls (it is in-process). It must never be forgotten.
    Embedded,
}

#[derive(Debug)]
struct SimAgent {
    kind: Kind,
    url: String,
    id: Option<AgentId>,
    secret: String,
    /// What it can run: every fourth agent has every label, so each build
    /// has somewhere to go.
    labels: Labels,
    health: Health,
    /// The attempt it works on and when its command finishes.
    job: Option<(StepId, Attempt, u64)>,
    next_beat: u64,
    /// A result not yet acknowledged, and when to retry it.
    outbox: Option<(Report, u64)>,
    /// Its credential was revoked: it never connects again.
    revoked: bool,
}

struct Sim {
    seed: u64,
    rng: fastrand::Rng,
    clock: Arc<ManualClock>,
    store: Arc<FaultyStore>,
    /// The store's failure rate, in percent (during the faults).
    fail_percent: Arc<AtomicU64>,
    /// Every attempt the server handed out to be sent.
    dispatched: BTreeSet<(StepId, Attempt)>,
    c: Coordinator,
    agents: Vec<SimAgent>,
    wire: Vec<(u64, Msg)>,
    submitted: Vec<BuildId>,
    /// The attempts whose result was taken, per step.
    accepted: HashMap<StepId, Vec<Attempt>>,
    faults: bool,
    step: usize,
}

macro_rules! check {
    ($sim:expr, $cond:expr, $($msg:tt)+) => {
        if !$cond {
            panic!(
                "seed {} step {} (replay with SIM_SEED={}): {}",
                $sim.seed, $sim.step, $sim.seed, format!($($msg)+)
            );
        }
    };
}

fn policy() -> LeasePolicy {
    LeasePolicy::new(Duration::from_millis(INTERVAL_MS), MISSED).unwrap()
}

impl Sim {
    async fn new(seed: u64) -> Sim {
        let clock = Arc::new(ManualClock::new(Timestamp(1_000_000)));
        // The store fails 3% of a pass's starts, results, heartbeats and
        // live output while the faults last.
        let fail_percent = Arc::new(AtomicU64::new(3));
        let rng = Mutex::new(fastrand::Rng::with_seed(seed ^ 0x5eed));
        let percent = fail_percent.clone();
        let store = Arc::new(FaultyStore::new(Arc::new(MemoryStore::new()), move |op: Op| {
            let _ = op;
            let p = percent.load(Ordering::SeqCst);
            p > 0 && rng.lock().unwrap().u64(..100) < p
        }));
        let c = Coordinator::builder(store.clone())
            .clock(clock.clone())
            .lease(policy())
            .build()
            .await
            .unwrap();
        Sim {
            seed,
            rng: fastrand::Rng::with_seed(seed),
            clock,
            store,
            fail_percent,
            dispatched: BTreeSet::new(),
            c,
            agents: Vec::new(),
            wire: Vec::new(),
            submitted: Vec::new(),
            accepted: HashMap::new(),
            faults: true,
            step: 0,
        }
    }

    fn now(&self) -> u64 {
        self.clock.now().0
    }

    /// Sends `msg`, maybe losing, delaying or duplicating it.
    fn send(&mut self, msg: Msg) {
        let now = self.now();
        // An embedded worker is in the server's process: no network between.
        let in_process = match &msg {
            Msg::Dispatch(d) => self
                .agents
                .iter()
                .any(|a| a.kind == Kind::Embedded && a.url == d.agent_url),
            Msg::Heartbeat { from, .. } | Msg::Result { from, .. } => {
                self.agents[*from].kind == Kind::Embedded
            }
            Msg::Stop(_) | Msg::StopFailed(_) => false,
        };
        if in_process {
            self.wire.push((now, msg));
            return;
        }
        if self.faults && self.rng.u8(..100) < 5 {
            if let Msg::Stop(order) = msg {
                self.wire
                    .push((now + self.rng.u64(0..1500), Msg::StopFailed(order)));
            }
            return; // lost
        }
        let delay = if self.faults && self.rng.u8(..100) < 10 {
            self.rng.u64(50..1500)
        } else {
            self.rng.u64(0..5)
        };
        if self.faults && self.rng.u8(..100) < 5 {
            self.wire.push((now + self.rng.u64(0..800), msg.clone())); // duplicated
        }
        self.wire.push((now + delay, msg));
    }

    /// Runs the schedule, then the calm; returns how many builds it made.
    async fn run(mut self) -> usize {
        let n_agents = self.rng.usize(1..5);
        for _ in 0..n_agents {
            self.add_agent(false).await;
        }
        for step in 0..STEPS {
            self.step = step;
            self.random_event().await;
            self.tick().await;
        }
        // Calm: no more faults; everyone alive comes back; let it drain.
        self.faults = false;
        self.fail_percent.store(0, Ordering::SeqCst);
        for a in &mut self.agents {
            if a.health != Health::Dead {
                a.health = Health::Up;
            }
        }
        // Someone alive can run every build (it takes the operator a new
        // machine if every such agent died).
        let every = Labels::parse(["os=a", "gpu"]).unwrap();
        if !self
            .agents
            .iter()
            .any(|a| a.health == Health::Up && a.labels.satisfy(&every))
        {
            self.add_agent(true).await;
        }
        for step in STEPS..STEPS + 5000 {
            self.step = step;
            self.tick().await;
            if self.all_done().await && self.wire.is_empty() {
                break;
            }
        }
        if std::env::var_os("SIM_DEBUG").is_some() && !self.all_done().await {
            for a in &self.agents {
                eprintln!(
                    "sim agent {:?} {} id={:?} {:?} job={:?} outbox={}",
                    a.kind,
                    a.url,
                    a.id,
                    a.health,
                    a.job,
                    a.outbox.is_some()
                );
            }
            for a in self.c.agents().await.unwrap() {
                eprintln!("pool {:?}", a);
                for s in &a.running {
                    eprintln!("  holds {:?}", self.store.step(*s).await.unwrap());
                }
            }
        }
        check!(
            self,
            self.all_done().await,
            "builds never finished: {:?}",
            self.unfinished().await
        );
        for id in &self.submitted {
            let build = self.store.build(*id).await.unwrap().unwrap();
            for step in &build.steps {
                let taken = self.accepted.get(&step.id).cloned().unwrap_or_default();
                let ran = matches!(step.status, StepStatus::Success | StepStatus::Failed);
                // N.B.: a step that counts lost agents fails without a
                // result when its agent is lost with no re-run left.
                let log = ci_core::Logs::log(&*self.store, step.id, None)
                    .await
                    .unwrap()
                    .unwrap_or_default();
                let lost = step.status == StepStatus::Failed
                    && taken.last() != Some(&step.attempt)
                    && step.retry_on.agent_lost
                    && step.retries_left == 0
                    && step.exit_code == Some(ci_core::Completion::NOT_RUN)
                    && log.complete
                    && log.attempt == step.attempt
                    && log.stderr.ends_with(ci_core::Requeue::LOST_LINE);
                let ran = ran && !lost;
                check!(
                    self,
                    !ran || taken.last() == Some(&step.attempt),
                    "step {} ({:?}) of build {id} ended without its last attempt's result: {taken:?} \
                     (attempt {}, exit {:?}, log {:?})",
                    step.id,
                    step.status,
                    step.attempt,
                    step.exit_code,
                    log
                );
                check!(
                    self,
                    step.status != StepStatus::Skipped || taken.is_empty(),
                    "skipped step {} has results {taken:?}",
                    step.id
                );
            }
        }
        self.submitted.len()
    }

    async fn all_done(&self) -> bool {
        // N.B.: counts, not every build read with its steps at every tick.
        let counts = self.store.status_counts().await.unwrap();
        counts.iter().all(|(status, n)| status.is_finished() || *n == 0)
    }

    async fn unfinished(&self) -> Vec<(BuildId, BuildStatus)> {
        let mut left = Vec::new();
        for id in &self.submitted {
            let status = self.store.build(*id).await.unwrap().unwrap().status;
            if !status.is_finished() {
                left.push((*id, status));
            }
        }
        left
    }

    async fn add_agent(&mut self, every_label: bool) {
        let n = self.agents.len();
        let kind = match self.rng.u8(..13) {
            0..=3 => Kind::Secure,
            11..=12 => Kind::Connected,
            4..=5 => Kind::Claims,
            6..=7 => Kind::Attempts,
            8..=9 => Kind::Original,
            _ => Kind::Embedded,
        };
        let labels = match (n % 4, self.rng.u8(..3)) {
            _ if every_label => Labels::parse(["os=a", "gpu"]).unwrap(),
            (0, _) => Labels::parse(["os=a", "gpu"]).unwrap(),
            (_, 0) => Labels::parse(["os=a"]).unwrap(),
            (_, 1) => Labels::parse(["gpu"]).unwrap(),
            _ => Labels::default(),
        };
        self.agents.push(SimAgent {
            kind,
            url: match kind {
                Kind::Connected => ci_core::protocol::connected_url(&format!("agent-{n}")),
                _ => format!("http://agent-{n}:3001"),
            },
            id: None,
            secret: format!("secret-{n}-0"),
            labels,
            health: Health::Up,
            job: None,
            next_beat: 0,
            outbox: None,
            revoked: false,
        });
        self.register(n).await;
    }

    async fn register(&mut self, i: usize) {
        let a = &mut self.agents[i];
        // Like ci-agent, a new process proves itself with the secret it kept.
        let proof = a.secret.clone();
        a.secret = format!(
            "{}-{}",
            a.secret.split('-').take(2).collect::<Vec<_>>().join("-"),
            self.step
        );
        let (url, secret, kind) = (a.url.clone(), a.secret.clone(), a.kind);
        let e = Enrollment {
            labels: a.labels.clone(),
            ..Enrollment::new(url.clone())
        };
        let registered = match kind {
            Kind::Secure | Kind::Connected => {
                let e = Enrollment {
                    secret: Some(secret),
                    ..e
                };
                self.c.register(e, Some(&proof)).await
            }
            Kind::Claims | Kind::Attempts | Kind::Original | Kind::Embedded => self.c.register(e, None).await,
        };
        match registered {
            Ok(r) => {
                let a = &mut self.agents[i];
                a.id = Some(r.id);
                // A new process: whatever the old one ran is gone.
                a.job = None;
                a.outbox = None;
            }
            Err(e) => check!(self, false, "registration failed: {e}"),
        }
    }

    async fn random_event(&mut self) {
        let roll = self.rng.u8(..100);
        match roll {
            0..=24 => {
                let new = self.random_build();
                let b = self.c.submit(&new).await.unwrap();
                if let Some(last) = self.submitted.last() {
                    check!(self, b.id > *last, "build number {} not above {last}", b.id);
                }
                self.submitted.push(b.id);
            }
            25..=27 if self.agents.len() < 8 => self.add_agent(false).await,
            28..=30 => {
                // An agent dies (an embedded worker lives as long as we do).
                let i = self.rng.usize(..self.agents.len());
                if self.agents[i].kind != Kind::Embedded {
                    self.agents[i].health = Health::Dead;
                    // Its connection, if it has one, closes with it.
                    self.connection_closed(i).await;
                }
            }
            31..=35 => {
                // An agent stalls, for less or more than the lease.
                let i = self.rng.usize(..self.agents.len());
                if self.agents[i].health == Health::Up && self.agents[i].kind != Kind::Embedded {
                    let until = self.now() + self.rng.u64(50..(INTERVAL_MS * u64::from(MISSED) * 3));
                    self.agents[i].health = Health::Stalled(until);
                }
            }
            36..=37 => {
                // A dead agent's machine comes back: a new process registers
                // at the same URL.
                let i = self.rng.usize(..self.agents.len());
                if self.agents[i].health == Health::Dead && !self.agents[i].revoked {
                    self.agents[i].health = Health::Up;
                    self.register(i).await;
                }
            }
            42..=43 => {
                // A connected agent's connection is reset; the process
                // lives: the server drops it at once, and the agent
                // registers again over a new one, its abandoned job gone
                // but its unacknowledged result kept (the spool), to be
                // refused as superseded.
                let i = self.rng.usize(..self.agents.len());
                if self.agents[i].kind == Kind::Connected && self.agents[i].health == Health::Up {
                    self.connection_closed(i).await;
                    let outbox = self.agents[i].outbox.take();
                    if outbox.is_some() {
                        SPOOLED_ACROSS.fetch_add(1, Ordering::Relaxed);
                    }
                    self.register(i).await;
                    self.agents[i].outbox = outbox;
                }
            }
            44 => {
                // A connected agent is revoked: dropped with its
                // connection, and it never comes back.
                let i = self.rng.usize(..self.agents.len());
                if self.agents[i].kind == Kind::Connected {
                    self.agents[i].revoked = true;
                    self.agents[i].health = Health::Dead;
                    self.connection_closed(i).await;
                }
            }
            38 => self.restart_server().await,
            39..=40 if !self.submitted.is_empty() => {
                // A user cancels a build.
                let id = self.submitted[self.rng.usize(..self.submitted.len())];
                match self.c.cancel(id).await {
                    Ok(Cancel { stops, .. }) => {
                        for order in stops {
                            self.send(Msg::Stop(order));
                        }
                    }
                    Err(Error::Conflict(_)) => {} // already finished
                    Err(e) => check!(self, false, "cancel failed: {e}"),
                }
            }
            41 if !self.submitted.is_empty() => {
                // A user retries a build's failed steps.
                let id = self.submitted[self.rng.usize(..self.submitted.len())];
                match self.c.retry(id).await {
                    Ok(_) | Err(Error::Conflict(_)) => {} // not finished yet
                    Err(e) => check!(self, false, "retry failed: {e}"),
                }
            }
            _ => {}
        }
    }

    /// The server sees a connected agent's connection close: it drops the
    /// agent, requeueing what it held. A store failure leaves it to the
    /// leases, as the server does.
    async fn connection_closed(&mut self, i: usize) {
        let (kind, id) = (self.agents[i].kind, self.agents[i].id);
        let (Kind::Connected, Some(id)) = (kind, id) else {
            return;
        };
        if self.agents[i].job.is_some() {
            CLOSED_HOLDING.fetch_add(1, Ordering::Relaxed);
        }
        if let Err(e) = self.c.agent_disconnected(id).await {
            check!(
                self,
                e.is_retryable(),
                "dropping a disconnected agent failed: {e}"
            );
        }
    }

    async fn restart_server(&mut self) {
        // Recovery reads the store; a store failing then is a server that
        // fails to start, and is started again.
        let c = loop {
            let built = Coordinator::builder(self.store.clone())
                .clock(self.clock.clone())
                .lease(policy())
                .build()
                .await;
            match built {
                Ok(c) => break c,
                Err(e) => check!(self, e.is_retryable(), "recovery failed: {e}"),
            }
        };
        self.c = c;
        self.check_invariants("after restart").await;
    }

    /// An agent without pings that the server dropped never finds out (a
    /// limitation of the original protocol); once the faults stop, its
    /// operator restarts it whenever that happens.
    async fn operator_restarts_forgotten_agents(&mut self) {
        let known: Vec<AgentId> = self.c.agents().await.unwrap().iter().map(|a| a.id).collect();
        for i in 0..self.agents.len() {
            let a = &self.agents[i];
            let pings = matches!(a.kind, Kind::Secure | Kind::Connected | Kind::Claims);
            if !pings && a.health == Health::Up && !a.id.is_some_and(|id| known.contains(&id)) {
                self.register(i).await;
            }
        }
    }

    /// Time passes; messages arrive; agents work; the server schedules.
    async fn tick(&mut self) {
        if !self.faults {
            self.operator_restarts_forgotten_agents().await;
        }
        self.clock
            .advance(Duration::from_millis(self.rng.u64(1..INTERVAL_MS)));
        let now = self.now();
        for a in &mut self.agents {
            if let Health::Stalled(until) = a.health {
                if now >= until {
                    a.health = Health::Up;
                }
            }
        }
        self.deliver_due().await;
        self.agents_work();
        if let Err(e) = self.c.expire().await {
            check!(self, e.is_retryable(), "expire failed: {e}");
        }
        // N.B.: the simulated agents ignore time limits, as the original
        // agent does: the server ends such attempts itself, and the result
        // it takes is its own.
        for order in self.c.time_out().await {
            self.accepted.entry(order.step).or_default().push(order.attempt);
            self.send(Msg::Stop(order));
        }
        let planned = self.c.plan().await;
        if let Ok(dispatches) = &planned {
            self.dispatched
                .extend(dispatches.iter().map(|d| (d.step.id, d.step.attempt)));
            for d in dispatches {
                self.check_dependencies_passed(d.step.id).await;
            }
        }
        self.check_invariants("after plan").await;
        self.check_events().await;
        match planned {
            Ok(dispatches) => {
                self.check_no_idle_agent_with_work().await;
                for d in dispatches {
                    self.send(Msg::Dispatch(Box::new(d)));
                }
            }
            Err(e) => check!(self, e.is_retryable(), "a pass failed: {e}"),
        }
    }

    async fn deliver_due(&mut self) {
        let now = self.now();
        let mut due: Vec<(u64, Msg)> = Vec::new();
        self.wire.retain(|(at, m)| {
            if *at <= now {
                due.push((*at, m.clone()));
                false
            } else {
                true
            }
        });
        due.sort_by_key(|(at, _)| *at);
        for (_, msg) in due {
            match msg {
                Msg::Dispatch(d) => self.agent_receives(*d).await,
                Msg::Heartbeat { from, hb } => {
                    if self.agents[from].health == Health::Dead {
                        continue; // a dead process's packets still arrive; they are answered to no one
                    }
                    let current = match hb.step {
                        Some(s) => Some(self.store.step(s).await.unwrap().unwrap().attempt),
                        None => None,
                    };
                    let r = self.c.heartbeat(hb).await;
                    // Attempt-less (original) heartbeats speak for the latest attempt.
                    if let (Ok(()), Some(current), Some(_)) = (&r, current, hb.attempt) {
                        check!(
                            self,
                            hb.attempt == Some(current),
                            "a heartbeat of attempt {:?} was accepted while attempt {current} is current",
                            hb.attempt
                        );
                    }
                    self.agent_hears_heartbeat_reply(from, hb, r).await;
                }
                Msg::Result { from, report } => self.server_receives_result(from, report).await,
                Msg::Stop(order) => {
                    let reached = self.agents.iter_mut().find(|a| {
                        a.url == order.agent_url && a.health == Health::Up && a.id == Some(order.agent)
                    });
                    let stopped = match reached {
                        // The original agent has no /cancel: its work runs
                        // on, and its result comes (and is refused).
                        Some(a) if a.kind == Kind::Original => Stopped::Unsupported,
                        Some(a) => {
                            if a.job
                                .is_some_and(|(s, at, _)| s == order.step && at == order.attempt)
                            {
                                a.job = None;
                            }
                            Stopped::Yes
                        }
                        None => Stopped::Unreachable,
                    };
                    self.c.stop_delivered(&order, stopped).await.unwrap();
                }
                Msg::StopFailed(order) => self.c.stop_delivered(&order, Stopped::Unreachable).await.unwrap(),
            }
        }
    }

    async fn agent_receives(&mut self, d: Dispatch) {
        let now = self.now();
        let Some(i) = self.agents.iter().position(|a| a.url == d.agent_url) else {
            return;
        };
        check!(
            self,
            self.agents[i].labels.satisfy(&d.step.labels),
            "step {} needs {:?}, sent to agent {} with {:?}",
            d.step.id,
            d.step.labels,
            d.agent,
            self.agents[i].labels
        );
        let a = &mut self.agents[i];
        let reachable = a.health == Health::Up && a.id == Some(d.agent);
        if !reachable {
            // Refused or timed out: the server drops the agent.
            self.c
                .dispatch_failed(&d, DispatchFailure::Unreachable("unreachable".into()))
                .await
                .unwrap();
            return;
        }
        if a.job.is_some() {
            // 409 busy: the build goes back, the agent cools down.
            self.c
                .dispatch_failed(&d, DispatchFailure::Busy("busy".into()))
                .await
                .unwrap();
            return;
        }
        let runs_for = self.rng.u64(10..(INTERVAL_MS * 10));
        a.job = Some((d.step.id, d.step.attempt, now + runs_for));
        a.next_beat = now;
    }

    async fn agent_hears_heartbeat_reply(&mut self, from: usize, hb: Heartbeat, r: Result<(), Error>) {
        let a = &mut self.agents[from];
        match (r, hb.step) {
            (Ok(()), _) => {}
            // Not heard (the store failed): keep going, as agents do.
            (Err(e), _) if e.is_retryable() => {}
            (Err(Error::AgentNotFound(_)), None) => {
                if a.health == Health::Up {
                    self.register(from).await;
                }
            }
            (Err(_), Some(b)) => {
                // Refused: this attempt no longer counts; stop its work.
                if a.job
                    .is_some_and(|(jb, ja, _)| jb == b && hb.attempt.is_none_or(|h| h == ja))
                {
                    a.job = None;
                }
            }
            (Err(_), None) => {}
        }
    }

    async fn server_receives_result(&mut self, from: usize, report: Report) {
        let before = self.store.step(report.step).await.unwrap().unwrap();
        let r = self.c.complete(report.clone()).await;
        // An attempt-less (original) result speaks for the latest attempt.
        let attempt = report.attempt.unwrap_or(before.attempt);
        let taken = self
            .accepted
            .get(&report.step)
            .is_some_and(|t| t.contains(&attempt));
        match &r {
            Ok(Accepted::Finished(_)) => {
                check!(
                    self,
                    !before.status.is_finished() && !taken,
                    "step {} took a result of attempt {attempt} twice",
                    report.step
                );
                check!(
                    self,
                    attempt == before.attempt,
                    "step {} accepted a result of attempt {attempt} while attempt {} was current",
                    report.step,
                    before.attempt
                );
                self.accepted.entry(report.step).or_default().push(attempt);
            }
            Ok(Accepted::Duplicate(_)) => {
                check!(self, taken, "a duplicate of a result never taken");
            }
            Err(_) => {}
        }
        // The agent learns the outcome (if it is alive to hear it).
        let a = &mut self.agents[from];
        if a.health != Health::Dead && a.outbox.as_ref().is_some_and(|(o, _)| *o == report) {
            let retry = r.as_ref().err().is_some_and(Error::is_retryable);
            if !retry {
                a.outbox = None;
            }
        }
    }

    fn agents_work(&mut self) {
        let now = self.now();
        let mut out = Vec::new();
        for (i, a) in self.agents.iter_mut().enumerate() {
            if a.health != Health::Up {
                continue;
            }
            let Some(id) = a.id else { continue };
            if let Some((step, attempt, done_at)) = a.job {
                let (attempt_field, agent_field, verified) = match a.kind {
                    Kind::Secure | Kind::Connected | Kind::Embedded => (Some(attempt), Some(id), true),
                    Kind::Claims => (Some(attempt), Some(id), false),
                    Kind::Attempts => (Some(attempt), None, false),
                    // N.B.: it sends only the `id` it was given, which names
                    // the attempt (`DispatchId`): the server reads the
                    // attempt from it.
                    Kind::Original => (Some(attempt), None, false),
                };
                if now >= done_at {
                    let report = Report {
                        step,
                        attempt: attempt_field,
                        agent: agent_field,
                        verified,
                        completion: Completion {
                            exit_code: i32::from((step.0 + i64::from(attempt.0)) % 3 == 0),
                            stdout: format!("step {step} attempt {attempt}"),
                            stderr: String::new(),
                        },
                    };
                    a.job = None;
                    a.outbox = Some((report, now));
                } else if now >= a.next_beat {
                    a.next_beat = now + INTERVAL_MS;
                    let hb = Heartbeat {
                        step: Some(step),
                        attempt: attempt_field,
                        agent: agent_field,
                        verified,
                    };
                    out.push(Msg::Heartbeat { from: i, hb });
                }
            } else if now >= a.next_beat && matches!(a.kind, Kind::Secure | Kind::Connected | Kind::Claims) {
                a.next_beat = now + INTERVAL_MS;
                let ping = Heartbeat {
                    step: None,
                    attempt: None,
                    agent: Some(id),
                    verified: matches!(a.kind, Kind::Secure | Kind::Connected),
                };
                out.push(Msg::Heartbeat { from: i, hb: ping });
            }
            if let Some((report, at)) = &mut a.outbox {
                if now >= *at {
                    *at = now + INTERVAL_MS * 2;
                    out.push(Msg::Result {
                        from: i,
                        report: report.clone(),
                    });
                }
            }
        }
        for m in out {
            self.send(m);
        }
    }

    async fn check_invariants(&self, when: &str) {
        let agents = self.c.agents().await.unwrap();
        for a in &agents {
            check!(
                self,
                a.running.len() <= a.capacity as usize,
                "{when}: agent {} holds {:?}",
                a.id,
                a.running
            );
        }
        // Every lease is a running attempt with a holder, and was handed out
        // to be sent: a failed pass strands none.
        for l in self.store.leases().await.unwrap() {
            let s = self.store.step(l.step).await.unwrap().unwrap();
            check!(
                self,
                s.status == StepStatus::Running && s.attempt == l.attempt && s.agent_id == Some(l.agent),
                "{when}: lease {l:?} but the step is {:?} attempt {} on {:?}",
                s.status,
                s.attempt,
                s.agent_id
            );
            let holds = agents
                .iter()
                .any(|a| a.id == l.agent && a.running.contains(&l.step));
            check!(self, holds, "{when}: lease {l:?} has no holder");
            check!(
                self,
                self.dispatched.contains(&(l.step, l.attempt)),
                "{when}: lease {l:?} was never dispatched: a stranded attempt"
            );
        }
    }

    /// An embedded worker is never dropped for silence, however long it
    /// idles: it never pings, so its silence means nothing. A build ends
    /// exactly when its last step does.
    async fn check_events(&mut self) {
        for e in self.c.take_events() {
            match e {
                ci_core::Event::AgentLeft { agent, reason } => {
                    let embedded = self
                        .agents
                        .iter()
                        .any(|a| a.kind == Kind::Embedded && a.id == Some(agent));
                    check!(
                        self,
                        !(embedded && reason == ci_core::coordinator::LeaveReason::Silent),
                        "embedded worker {agent} was dropped for silence"
                    );
                }
                ci_core::Event::StepFinished { build, .. } | ci_core::Event::Finished { build, .. } => {
                    let b = self.store.build(build).await.unwrap().unwrap();
                    let all_ended = b.steps.iter().all(|s| s.status.is_finished());
                    check!(
                        self,
                        b.status.is_finished() == all_ended,
                        "build {build} is {} while its steps are {:?}",
                        b.status,
                        b.steps.iter().map(|s| s.status).collect::<Vec<_>>()
                    );
                }
                _ => {}
            }
        }
    }

    /// A dispatched step's dependencies all passed.
    async fn check_dependencies_passed(&self, id: StepId) {
        let step = self.store.step(id).await.unwrap().unwrap();
        let build = self.store.build(step.build).await.unwrap().unwrap();
        for d in &step.depends_on {
            let dep = build.step(d).unwrap();
            check!(
                self,
                dep.passed(),
                "step {} started while its dependency {d} is {:?}",
                step.name,
                dep.status
            );
        }
    }

    /// A build of one step, or of a random graph of up to six steps, each
    /// depending on some earlier ones, some with labels, some allowed to
    /// fail, some with retries (spent by random causes).
    fn random_build(&mut self) -> NewBuild {
        let repo = RepoUrl::parse("/srv/repo").unwrap();
        let mut new = NewBuild::new(repo, CommitRef::parse("abcd").unwrap(), "make").unwrap();
        let labels = |rng: &mut fastrand::Rng| match rng.u8(..6) {
            0 => Labels::parse(["os=a"]).unwrap(),
            1 => Labels::parse(["gpu", "os=a"]).unwrap(),
            _ => Labels::default(),
        };
        if self.rng.bool() {
            new.labels = labels(&mut self.rng);
            return new;
        }
        let n = self.rng.usize(2..=6);
        for i in 0..n {
            let depends_on = (0..i)
                .filter(|_| self.rng.u8(..3) == 0)
                .map(|j| format!("s{j}"))
                .collect();
            new.steps.push(NewStep {
                name: format!("s{i}"),
                command: format!("make s{i}"),
                labels: labels(&mut self.rng),
                depends_on,
                allow_failure: self.rng.u8(..5) == 0,
                retries: u32::from(self.rng.u8(..4) == 0),
                // Some count lost agents, and fail once their retry is spent.
                retry_on: ci_core::model::RetryOn::from_bits(self.rng.u8(..8)),
                // Some have a time limit shorter than some runs.
                timeout_ms: (self.rng.u8(..4) == 0).then(|| self.rng.u64(100..INTERVAL_MS * 8)),
                ..NewStep::default()
            });
        }
        new
    }

    /// After a scheduling pass, a queued step (however deep in the queue)
    /// and a free agent that could take it (not cooling down after a busy
    /// answer) never coexist.
    async fn check_no_idle_agent_with_work(&self) {
        let queued = self.store.queued(usize::MAX).await.unwrap();
        let now = self.clock.now();
        let agents = self.c.agents().await.unwrap();
        let free: Vec<_> = agents.iter().filter(|a| a.is_ready(now)).collect();
        for b in &queued {
            let fits = free.iter().filter(|a| a.labels.satisfy(&b.labels)).count();
            check!(
                self,
                fits == 0,
                "step {} ({:?}) waits while {fits} free agents could take it",
                b.id,
                b.labels
            );
        }
    }
}

/// How often, over all seeds, a connection closed while its agent held a
/// step, and an agent reconnected with a result not yet acknowledged: the
/// run checks the new transport's cases happened.
static CLOSED_HOLDING: AtomicUsize = AtomicUsize::new(0);
static SPOOLED_ACROSS: AtomicUsize = AtomicUsize::new(0);

#[test]
fn simulated_clusters_keep_every_invariant() {
    let seeds: Vec<u64> = match std::env::var("SIM_SEED") {
        Ok(s) => vec![s.parse().expect("SIM_SEED is a number")],
        Err(_) => {
            let n: u64 = std::env::var("SIM_SEEDS")
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(2000);
            (0..n).collect()
        }
    };
    #[allow(clippy::disallowed_types)] // wall time of the whole run, only reported
    let t0 = std::time::Instant::now();
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    let builds: usize = seeds
        .iter()
        .map(|seed| rt.block_on(async { Sim::new(*seed).await.run().await }))
        .sum();
    let (closed, spooled) = (
        CLOSED_HOLDING.load(Ordering::Relaxed),
        SPOOLED_ACROSS.load(Ordering::Relaxed),
    );
    println!(
        "simulated {} seeds x {STEPS} steps, {builds} builds, in {:.2?}; {closed} connections closed \
         holding a step, {spooled} reconnects with a result in the spool",
        seeds.len(),
        t0.elapsed()
    );
    if seeds.len() >= 100 {
        assert!(closed > 0 && spooled > 0, "the connection cases never happened");
    }
}
