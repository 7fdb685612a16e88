//! The build store: where builds, their logs and the agent registry live.
//!
//! Every method is one atomic step: it happens entirely or not at all, and
//! once it returns `Ok` it is durable as far as the implementation promises.
//! The state-changing methods are *fenced*: they take the attempt they
//! expect and do nothing (returning `false`/`None`) if the build moved on.
//! [`MemoryStore`] is the reference implementation; `ci-store` provides
//! SQLite.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Mutex, MutexGuard, PoisonError};

use crate::clock::Timestamp;
use crate::error::Result;
use crate::model::{
    limits, AgentId, AgentRecord, Attempt, Build, BuildId, BuildLog, BuildStatus, Completion, LogInfo,
    LogPiece, NewBuild, Page,
};
use crate::runner::Stream;

/// Persistence for builds and agents.
#[cfg_attr(test, mockall::automock)]
pub trait BuildStore: Send + Sync {
    /// Stores a new queued build and gives it the next, never used, number.
    fn create_build(&self, new: &NewBuild, now: Timestamp) -> Result<Build>;

    /// The build with this id.
    fn build(&self, id: BuildId) -> Result<Option<Build>>;

    /// A page of builds, newest first.
    fn list_builds(&self, page: Page) -> Result<Vec<Build>>;

    /// Up to `limit` queued builds, oldest first.
    fn queued_builds(&self, limit: usize) -> Result<Vec<Build>>;

    /// Every running build.
    fn running_builds(&self) -> Result<Vec<Build>>;

    /// Starts a new attempt of a queued build on `agent`: the status becomes
    /// running and the attempt number goes up by one. `None` if the build is
    /// not queued.
    fn start_attempt(&self, id: BuildId, agent: &AgentRecord, now: Timestamp) -> Result<Option<Build>>;

    /// Puts a running build back in the queue, keeping its attempt number,
    /// if `attempt` is still its latest. Returns whether it did.
    fn requeue(&self, id: BuildId, attempt: Attempt) -> Result<bool>;

    /// Records the result of `attempt` and finishes the build, if the build
    /// is unfinished and `attempt` is its latest. Returns whether it did.
    fn finish(&self, id: BuildId, attempt: Attempt, result: &Completion, now: Timestamp) -> Result<bool>;

    /// Cancels a build that is queued, or running as `attempt`. Returns
    /// whether it did.
    fn cancel(&self, id: BuildId, attempt: Attempt, now: Timestamp) -> Result<bool>;

    /// Appends live output of `attempt`, if it is the build's running
    /// attempt. Pieces are taken in `seq` order; a `seq` at or below the
    /// highest already taken is a repeat and ignored, and nothing is kept
    /// past [`limits::MAX_LOG`] per stream. Returns how many pieces were
    /// stored. Consecutive pieces of one stream may be stored as one (with
    /// the last one's `seq`), and the cost does not grow with what is
    /// already stored.
    fn append_log(&self, id: BuildId, attempt: Attempt, pieces: &[LogPiece]) -> Result<usize>;

    /// Live output of `attempt` with `seq` above `after`, in order.
    fn log_pieces(&self, id: BuildId, attempt: Attempt, after: Option<u64>) -> Result<Vec<LogPiece>>;

    /// The output of one attempt; the latest if `attempt` is `None`: the
    /// accepted result's log if there is one, else what was streamed.
    fn log(&self, id: BuildId, attempt: Option<Attempt>) -> Result<Option<BuildLog>>;

    /// What [`BuildStore::log`] would return, without the text: for
    /// answering with a log of any size in bounded memory.
    fn log_info(&self, id: BuildId, attempt: Option<Attempt>) -> Result<Option<LogInfo>> {
        Ok(self.log(id, attempt)?.map(|l| LogInfo {
            attempt: l.attempt,
            complete: l.complete,
            stdout_len: l.stdout.len() as u64,
            stderr_len: l.stderr.len() as u64,
        }))
    }

    /// Up to `max` bytes of one stream of an attempt's accepted log, from
    /// byte `offset` (which may fall inside a character); empty past the
    /// end or if there is no accepted log.
    fn read_log(
        &self,
        id: BuildId,
        attempt: Attempt,
        stream: Stream,
        offset: u64,
        max: usize,
    ) -> Result<Vec<u8>> {
        let Some(log) = self.log(id, Some(attempt))?.filter(|l| l.complete) else {
            return Ok(Vec::new());
        };
        let text = match stream {
            Stream::Stdout => log.stdout,
            Stream::Stderr => log.stderr,
        };
        let start = usize::try_from(offset).unwrap_or(usize::MAX).min(text.len());
        let end = start.saturating_add(max).min(text.len());
        Ok(text.as_bytes()[start..end].to_vec())
    }

    /// [`BuildStore::log_pieces`], at most `limit` of them.
    fn log_pieces_page(
        &self,
        id: BuildId,
        attempt: Attempt,
        after: Option<u64>,
        limit: usize,
    ) -> Result<Vec<LogPiece>> {
        let mut pieces = self.log_pieces(id, attempt, after)?;
        pieces.truncate(limit);
        Ok(pieces)
    }

    /// How many builds are in each status.
    fn status_counts(&self) -> Result<Vec<(BuildStatus, u64)>>;

    /// Registers an agent at `url` with a new id (and its session secret, if
    /// any), replacing any agent registered at the same URL.
    #[allow(clippy::needless_lifetimes)] // mockall needs the lifetime named
    fn register_agent<'a>(&self, url: &str, secret: Option<&'a str>, now: Timestamp) -> Result<AgentRecord>;

    /// Forgets an agent. Not an error if it is already gone.
    fn remove_agent(&self, id: AgentId) -> Result<()>;

    /// Every registered agent.
    fn agents(&self) -> Result<Vec<AgentRecord>>;
}

// === impl MemoryStore ===

/// A [`BuildStore`] in memory: for tests, simulations and embedding where
/// nothing needs to survive the process.
#[derive(Debug, Default)]
pub struct MemoryStore {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    last_build: i64,
    last_agent: i64,
    builds: BTreeMap<BuildId, Build>,
    queue: BTreeSet<BuildId>,
    logs: HashMap<(BuildId, Attempt), BuildLog>,
    pieces: HashMap<(BuildId, Attempt), BTreeMap<u64, LogPiece>>,
    /// Per attempt: the highest `seq` taken and the bytes kept per stream.
    live: HashMap<(BuildId, Attempt), (Option<u64>, [usize; 2])>,
    agents: BTreeMap<AgentId, AgentRecord>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> MemoryStore {
        MemoryStore::default()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl BuildStore for MemoryStore {
    fn create_build(&self, new: &NewBuild, now: Timestamp) -> Result<Build> {
        let mut s = self.lock();
        s.last_build += 1;
        let build = Build {
            id: BuildId(s.last_build),
            repo: new.repo.as_str().to_owned(),
            hash: new.hash.as_str().to_owned(),
            branch: new.branch.clone(),
            command: new.command.clone(),
            image: new.image.clone(),
            timeout_ms: new.timeout_ms,
            status: BuildStatus::Queued,
            attempt: Attempt(0),
            agent_id: None,
            agent_url: None,
            exit_code: None,
            created_at: now,
            started_at: None,
            finished_at: None,
        };
        s.queue.insert(build.id);
        s.builds.insert(build.id, build.clone());
        Ok(build)
    }

    fn build(&self, id: BuildId) -> Result<Option<Build>> {
        Ok(self.lock().builds.get(&id).cloned())
    }

    fn list_builds(&self, page: Page) -> Result<Vec<Build>> {
        let s = self.lock();
        let end = page.before.unwrap_or(BuildId(i64::MAX));
        Ok(s.builds
            .range(..end)
            .map(|(_, b)| b)
            .rev()
            .skip(page.offset)
            .take(page.limit)
            .cloned()
            .collect())
    }

    fn queued_builds(&self, limit: usize) -> Result<Vec<Build>> {
        let s = self.lock();
        Ok(s.queue
            .iter()
            .take(limit)
            .filter_map(|id| s.builds.get(id).cloned())
            .collect())
    }

    fn running_builds(&self) -> Result<Vec<Build>> {
        let s = self.lock();
        Ok(s.builds
            .values()
            .filter(|b| b.status == BuildStatus::Running)
            .cloned()
            .collect())
    }

    fn start_attempt(&self, id: BuildId, agent: &AgentRecord, now: Timestamp) -> Result<Option<Build>> {
        let mut s = self.lock();
        let Some(b) = s.builds.get_mut(&id).filter(|b| b.status == BuildStatus::Queued) else {
            return Ok(None);
        };
        b.status = BuildStatus::Running;
        b.attempt = b.attempt.next();
        b.agent_id = Some(agent.id);
        b.agent_url = Some(agent.url.clone());
        b.started_at = Some(now);
        let b = b.clone();
        s.queue.remove(&id);
        Ok(Some(b))
    }

    fn requeue(&self, id: BuildId, attempt: Attempt) -> Result<bool> {
        let mut s = self.lock();
        let Some(b) = s
            .builds
            .get_mut(&id)
            .filter(|b| b.status == BuildStatus::Running && b.attempt == attempt)
        else {
            return Ok(false);
        };
        b.status = BuildStatus::Queued;
        s.queue.insert(id);
        Ok(true)
    }

    fn finish(&self, id: BuildId, attempt: Attempt, result: &Completion, now: Timestamp) -> Result<bool> {
        let mut s = self.lock();
        let Some(b) = s
            .builds
            .get_mut(&id)
            .filter(|b| !b.status.is_finished() && b.attempt == attempt && attempt.0 > 0)
        else {
            return Ok(false);
        };
        b.status = BuildStatus::from_exit_code(result.exit_code);
        b.exit_code = Some(result.exit_code);
        b.finished_at = Some(now);
        s.queue.remove(&id);
        s.logs.insert(
            (id, attempt),
            BuildLog {
                attempt,
                stdout: result.stdout.clone(),
                stderr: result.stderr.clone(),
                complete: true,
            },
        );
        s.pieces.remove(&(id, attempt));
        s.live.remove(&(id, attempt));
        Ok(true)
    }

    fn cancel(&self, id: BuildId, attempt: Attempt, now: Timestamp) -> Result<bool> {
        let mut s = self.lock();
        let Some(b) = s
            .builds
            .get_mut(&id)
            .filter(|b| !b.status.is_finished() && b.attempt == attempt)
        else {
            return Ok(false);
        };
        b.status = BuildStatus::Canceled;
        b.finished_at = Some(now);
        s.queue.remove(&id);
        Ok(true)
    }

    fn append_log(&self, id: BuildId, attempt: Attempt, pieces: &[LogPiece]) -> Result<usize> {
        let mut s = self.lock();
        let running = s
            .builds
            .get(&id)
            .is_some_and(|b| b.status == BuildStatus::Running && b.attempt == attempt);
        if !running {
            return Ok(0);
        }
        let (last, bytes) = s.live.get(&(id, attempt)).copied().unwrap_or_default();
        let mut taken = Taken::new(last, bytes);
        let rows = taken.take(pieces);
        s.live.insert((id, attempt), (taken.last, taken.bytes));
        let stored = s.pieces.entry((id, attempt)).or_default();
        for row in rows {
            stored.insert(row.seq, row);
        }
        Ok(taken.added)
    }

    fn log_pieces(&self, id: BuildId, attempt: Attempt, after: Option<u64>) -> Result<Vec<LogPiece>> {
        let s = self.lock();
        Ok(s.pieces
            .get(&(id, attempt))
            .map(|m| {
                m.values()
                    .filter(|p| after.is_none_or(|a| p.seq > a))
                    .cloned()
                    .collect()
            })
            .unwrap_or_default())
    }

    fn log(&self, id: BuildId, attempt: Option<Attempt>) -> Result<Option<BuildLog>> {
        let s = self.lock();
        let Some(b) = s.builds.get(&id) else {
            return Ok(None);
        };
        let attempt = attempt.unwrap_or(b.attempt);
        if let Some(log) = s.logs.get(&(id, attempt)) {
            return Ok(Some(log.clone()));
        }
        Ok(s.pieces
            .get(&(id, attempt))
            .map(|m| assemble(attempt, m.values())))
    }

    fn status_counts(&self) -> Result<Vec<(BuildStatus, u64)>> {
        let s = self.lock();
        Ok(BuildStatus::ALL
            .iter()
            .map(|st| (*st, s.builds.values().filter(|b| b.status == *st).count() as u64))
            .collect())
    }

    fn register_agent(&self, url: &str, secret: Option<&str>, now: Timestamp) -> Result<AgentRecord> {
        let mut s = self.lock();
        s.agents.retain(|_, a| a.url != url);
        s.last_agent += 1;
        let rec = AgentRecord {
            id: AgentId(s.last_agent),
            url: url.to_owned(),
            registered_at: now,
            secret: secret.map(str::to_owned),
        };
        s.agents.insert(rec.id, rec.clone());
        Ok(rec)
    }

    fn remove_agent(&self, id: AgentId) -> Result<()> {
        self.lock().agents.remove(&id);
        Ok(())
    }

    fn agents(&self) -> Result<Vec<AgentRecord>> {
        Ok(self.lock().agents.values().cloned().collect())
    }
}

/// Live pieces of one append, checked against what was taken before:
/// the rule of [`BuildStore::append_log`], for every store to share.
#[derive(Debug)]
pub struct Taken {
    /// The highest `seq` taken so far, if any.
    pub last: Option<u64>,
    /// Bytes kept so far: stdout, stderr.
    pub bytes: [usize; 2],
    /// Pieces taken by this append.
    pub added: usize,
}

impl Taken {
    /// Starts from what was taken before.
    pub fn new(last: Option<u64>, bytes: [usize; 2]) -> Taken {
        Taken {
            last,
            bytes,
            added: 0,
        }
    }

    /// The rows to store for `pieces`: new pieces in `seq` order, those
    /// past the cap left out, consecutive ones of one stream joined.
    pub fn take(&mut self, pieces: &[LogPiece]) -> Vec<LogPiece> {
        let mut new: Vec<&LogPiece> = pieces
            .iter()
            .filter(|p| self.last.is_none_or(|l| p.seq > l))
            .collect();
        new.sort_by_key(|p| p.seq);
        new.dedup_by_key(|p| p.seq);
        let mut rows: Vec<LogPiece> = Vec::new();
        for p in new {
            self.last = Some(p.seq);
            let used = &mut self.bytes[match p.stream {
                Stream::Stdout => 0,
                Stream::Stderr => 1,
            }];
            if *used + p.data.len() > limits::MAX_LOG {
                continue;
            }
            *used += p.data.len();
            self.added += 1;
            match rows.last_mut() {
                Some(row) if row.stream == p.stream => {
                    row.data.push_str(&p.data);
                    row.seq = p.seq;
                }
                _ => rows.push(p.clone()),
            }
        }
        rows
    }
}

/// The partial log of an attempt from its live pieces, in order.
pub fn assemble<'a>(attempt: Attempt, pieces: impl IntoIterator<Item = &'a LogPiece>) -> BuildLog {
    let mut log = BuildLog {
        attempt,
        complete: false,
        ..BuildLog::default()
    };
    for p in pieces {
        match p.stream {
            Stream::Stdout => log.stdout.push_str(&p.data),
            Stream::Stderr => log.stderr.push_str(&p.data),
        }
    }
    log
}

/// Conformance tests that any [`BuildStore`] must pass. `ci-store` runs
/// them against SQLite. Enabled by the `test-support` feature.
#[cfg(any(test, feature = "test-support"))]
pub mod conformance {
    use super::*;
    use crate::model::{CommitRef, RepoUrl};

    fn new_build(command: &str) -> NewBuild {
        let repo = RepoUrl::parse("/srv/repo").unwrap_or_else(|e| panic!("{e}"));
        let hash = CommitRef::parse("abcdef1").unwrap_or_else(|e| panic!("{e}"));
        NewBuild::new(repo, hash, command).unwrap_or_else(|e| panic!("{e}"))
    }

    fn ok<T>(r: Result<T>) -> T {
        r.unwrap_or_else(|e| panic!("store error: {e}"))
    }

    /// Runs every check against stores made by `make` (one fresh store per
    /// check).
    pub fn run_all<S: BuildStore>(make: impl Fn() -> S) {
        ids_increase(&make());
        queue_is_fifo(&make());
        attempts_are_fenced(&make());
        logs_are_kept_per_attempt(&make());
        agents_register_and_replace(&make());
        listing_is_newest_first(&make());
        cancel_is_fenced(&make());
        live_logs_are_ordered_fenced_and_idempotent(&make());
        live_logs_are_capped_and_joined(&make());
        logs_read_in_pieces(&make());
    }

    /// A log read a piece at a time is the log.
    pub fn logs_read_in_pieces<S: BuildStore>(s: &S) {
        let agent = ok(s.register_agent("http://a:1", None, Timestamp(0)));
        let id = ok(s.create_build(&new_build("x"), Timestamp(0))).id;
        assert_eq!(ok(s.log_info(id, None)), None);
        ok(s.start_attempt(id, &agent, Timestamp(1)));
        let piece = |seq, stream, data: &str| LogPiece {
            seq,
            stream,
            data: data.to_owned(),
        };
        let live = [
            piece(0, Stream::Stdout, "ab"),
            piece(1, Stream::Stderr, "é"),
            piece(2, Stream::Stdout, "c"),
        ];
        ok(s.append_log(id, Attempt(1), &live));
        let info = ok(s.log_info(id, None)).unwrap_or_default();
        assert_eq!((info.complete, info.stdout_len, info.stderr_len), (false, 3, 2));
        let page: Vec<u64> = ok(s.log_pieces_page(id, Attempt(1), None, 2))
            .iter()
            .map(|p| p.seq)
            .collect();
        assert_eq!(page, vec![0, 1]);
        assert_eq!(ok(s.log_pieces_page(id, Attempt(1), Some(1), 2)).len(), 1);
        let done = Completion {
            exit_code: 0,
            stdout: "héllo wörld".into(),
            stderr: "e".into(),
        };
        assert!(ok(s.finish(id, Attempt(1), &done, Timestamp(2))));
        let info = ok(s.log_info(id, None)).unwrap_or_default();
        assert_eq!(
            (info.attempt, info.complete, info.stdout_len, info.stderr_len),
            (Attempt(1), true, 13, 1)
        );
        let mut read = Vec::new();
        let mut offset = 0;
        loop {
            let chunk = ok(s.read_log(id, Attempt(1), Stream::Stdout, offset, 4));
            if chunk.is_empty() {
                break;
            }
            assert!(chunk.len() <= 4);
            offset += chunk.len() as u64;
            read.extend(chunk);
        }
        assert_eq!(String::from_utf8(read).ok().as_deref(), Some("héllo wörld"));
        assert_eq!(ok(s.read_log(id, Attempt(1), Stream::Stderr, 0, 100)), b"e");
        assert_eq!(ok(s.read_log(id, Attempt(1), Stream::Stderr, 9, 100)), b"");
        assert_eq!(ok(s.read_log(id, Attempt(2), Stream::Stdout, 0, 100)), b"");
    }

    /// Many small pieces: kept up to the cap per stream, joined into few
    /// rows, with retries of overlapping batches stored once.
    pub fn live_logs_are_capped_and_joined<S: BuildStore>(s: &S) {
        let agent = ok(s.register_agent("http://a:1", None, Timestamp(0)));
        let id = ok(s.create_build(&new_build("x"), Timestamp(0))).id;
        ok(s.start_attempt(id, &agent, Timestamp(1)));
        let pieces: Vec<LogPiece> = (0..20_000)
            .map(|seq| LogPiece {
                seq,
                stream: Stream::Stdout,
                data: "y".into(),
            })
            .collect();
        assert_eq!(ok(s.append_log(id, Attempt(1), &pieces[..10_000])), 10_000);
        // A retry that overlaps the last batch stores only what is new.
        assert_eq!(ok(s.append_log(id, Attempt(1), &pieces[5_000..])), 10_000);
        let rows = ok(s.log_pieces(id, Attempt(1), None));
        assert!(rows.len() <= 2, "{} rows for two batches", rows.len());
        assert_eq!(rows.last().map(|p| p.seq), Some(19_999));
        let text: usize = rows.iter().map(|p| p.data.len()).sum();
        assert_eq!(text, 20_000);
        // Nothing past the cap; the other stream still has room.
        let big = |seq, stream| LogPiece {
            seq,
            stream,
            data: "z".repeat(limits::MAX_LOG),
        };
        assert_eq!(
            ok(s.append_log(id, Attempt(1), &[big(20_000, Stream::Stdout)])),
            0
        );
        assert_eq!(
            ok(s.append_log(id, Attempt(1), &[big(20_001, Stream::Stderr)])),
            1
        );
        let log = ok(s.log(id, None)).unwrap_or_default();
        assert_eq!((log.stdout.len(), log.stderr.len()), (20_000, limits::MAX_LOG));
    }

    /// Cancel acts on queued builds and on the running attempt only.
    pub fn cancel_is_fenced<S: BuildStore>(s: &S) {
        let agent = ok(s.register_agent("http://a:1", None, Timestamp(0)));
        let queued = ok(s.create_build(&new_build("q"), Timestamp(0))).id;
        assert!(ok(s.cancel(queued, Attempt(0), Timestamp(5))));
        assert_eq!(
            ok(s.queued_builds(10)),
            vec![],
            "a canceled build leaves the queue"
        );
        let b = ok(s.build(queued)).unwrap_or_else(|| panic!("gone"));
        assert_eq!(
            (b.status, b.finished_at),
            (BuildStatus::Canceled, Some(Timestamp(5)))
        );
        assert!(!ok(s.cancel(queued, Attempt(0), Timestamp(6))), "once");

        let running = ok(s.create_build(&new_build("r"), Timestamp(0))).id;
        ok(s.start_attempt(running, &agent, Timestamp(1)));
        assert!(
            !ok(s.cancel(running, Attempt(0), Timestamp(2))),
            "not the running attempt"
        );
        assert!(ok(s.cancel(running, Attempt(1), Timestamp(2))));
        let done = Completion {
            exit_code: 0,
            stdout: String::new(),
            stderr: String::new(),
        };
        assert!(
            !ok(s.finish(running, Attempt(1), &done, Timestamp(3))),
            "a canceled build takes no result"
        );
        let counts = ok(s.status_counts());
        assert!(counts.contains(&(BuildStatus::Canceled, 2)), "{counts:?}");
        assert!(counts.contains(&(BuildStatus::Running, 0)), "{counts:?}");
    }

    /// Live output: in seq order, repeats ignored, only for the running
    /// attempt, replaced by the final log.
    pub fn live_logs_are_ordered_fenced_and_idempotent<S: BuildStore>(s: &S) {
        let agent = ok(s.register_agent("http://a:1", None, Timestamp(0)));
        let id = ok(s.create_build(&new_build("x"), Timestamp(0))).id;
        let piece = |seq, stream, data: &str| LogPiece {
            seq,
            stream,
            data: data.to_owned(),
        };
        assert_eq!(
            ok(s.append_log(id, Attempt(1), &[piece(0, Stream::Stdout, "x")])),
            0,
            "not running"
        );
        ok(s.start_attempt(id, &agent, Timestamp(1)));
        let batch = [piece(1, Stream::Stderr, "warn\n"), piece(0, Stream::Stdout, "a")];
        assert_eq!(ok(s.append_log(id, Attempt(1), &batch)), 2);
        assert_eq!(
            ok(s.append_log(id, Attempt(1), &batch)),
            0,
            "a retry stores nothing twice"
        );
        assert_eq!(
            ok(s.append_log(id, Attempt(1), &[piece(2, Stream::Stdout, "b")])),
            1
        );
        let seqs: Vec<u64> = ok(s.log_pieces(id, Attempt(1), None))
            .iter()
            .map(|p| p.seq)
            .collect();
        assert_eq!(seqs, vec![0, 1, 2]);
        assert_eq!(ok(s.log_pieces(id, Attempt(1), Some(1))).len(), 1);
        let partial = ok(s.log(id, None)).unwrap_or_default();
        assert_eq!(
            (partial.stdout.as_str(), partial.stderr.as_str(), partial.complete),
            ("ab", "warn\n", false)
        );

        // The attempt is lost; its partial log stays; attempt 2 logs apart.
        assert!(ok(s.requeue(id, Attempt(1))));
        ok(s.start_attempt(id, &agent, Timestamp(2)));
        assert_eq!(
            ok(s.append_log(id, Attempt(1), &[piece(3, Stream::Stdout, "late")])),
            0,
            "superseded"
        );
        assert_eq!(
            ok(s.append_log(id, Attempt(2), &[piece(0, Stream::Stdout, "second")])),
            1
        );
        assert_eq!(
            ok(s.log(id, Some(Attempt(1)))).map(|l| l.stdout),
            Some("ab".into())
        );
        let done = Completion {
            exit_code: 0,
            stdout: "second, final".into(),
            stderr: String::new(),
        };
        assert!(ok(s.finish(id, Attempt(2), &done, Timestamp(3))));
        let fin = ok(s.log(id, None)).unwrap_or_default();
        assert_eq!((fin.stdout.as_str(), fin.complete), ("second, final", true));
        assert_eq!(
            ok(s.log_pieces(id, Attempt(2), None)),
            vec![],
            "the final log replaces the pieces"
        );
        assert_eq!(ok(s.log(id, Some(Attempt(1)))).map(|l| l.complete), Some(false));
    }

    /// Build ids increase by one.
    pub fn ids_increase<S: BuildStore>(s: &S) {
        let a = ok(s.create_build(&new_build("a"), Timestamp(1)));
        let b = ok(s.create_build(&new_build("b"), Timestamp(2)));
        assert!(b.id > a.id);
        assert_eq!(a.status, BuildStatus::Queued);
        assert_eq!(a.attempt, Attempt(0));
        assert_eq!(ok(s.build(a.id)), Some(a));
        assert_eq!(ok(s.build(BuildId(999))), None);
    }

    /// Queued builds come out oldest first and leave the queue when started.
    pub fn queue_is_fifo<S: BuildStore>(s: &S) {
        let agent = ok(s.register_agent("http://a:1", None, Timestamp(0)));
        let ids: Vec<_> = (0..5)
            .map(|i| ok(s.create_build(&new_build(&format!("c{i}")), Timestamp(i))).id)
            .collect();
        let q: Vec<_> = ok(s.queued_builds(3)).iter().map(|b| b.id).collect();
        assert_eq!(q, ids[..3]);
        let started = ok(s.start_attempt(ids[0], &agent, Timestamp(10))).map(|b| b.status);
        assert_eq!(started, Some(BuildStatus::Running));
        assert_eq!(
            ok(s.start_attempt(ids[0], &agent, Timestamp(10))),
            None,
            "not queued"
        );
        let q: Vec<_> = ok(s.queued_builds(10)).iter().map(|b| b.id).collect();
        assert_eq!(q, ids[1..]);
        assert_eq!(ok(s.running_builds()).len(), 1);
    }

    /// Requeue and finish only act on the latest attempt.
    pub fn attempts_are_fenced<S: BuildStore>(s: &S) {
        let agent = ok(s.register_agent("http://a:1", None, Timestamp(0)));
        let id = ok(s.create_build(&new_build("x"), Timestamp(0))).id;
        let done = Completion {
            exit_code: 0,
            stdout: "out".into(),
            stderr: String::new(),
        };
        assert!(
            !ok(s.finish(id, Attempt(0), &done, Timestamp(1))),
            "never dispatched"
        );
        let b1 = ok(s.start_attempt(id, &agent, Timestamp(1))).map(|b| b.attempt);
        assert_eq!(b1, Some(Attempt(1)));
        assert!(!ok(s.requeue(id, Attempt(2))));
        assert!(ok(s.requeue(id, Attempt(1))));
        assert!(!ok(s.requeue(id, Attempt(1))), "already queued");
        let b2 = ok(s.start_attempt(id, &agent, Timestamp(2))).map(|b| b.attempt);
        assert_eq!(b2, Some(Attempt(2)));
        assert!(!ok(s.finish(id, Attempt(1), &done, Timestamp(3))), "superseded");
        assert!(ok(s.finish(id, Attempt(2), &done, Timestamp(3))));
        assert!(
            !ok(s.finish(id, Attempt(2), &done, Timestamp(4))),
            "finished once"
        );
        let b = ok(s.build(id)).unwrap_or_else(|| panic!("build {id} vanished"));
        assert_eq!(b.status, BuildStatus::Success);
        assert_eq!(b.exit_code, Some(0));
        assert_eq!(b.finished_at, Some(Timestamp(3)));
        assert_eq!(b.started_at, Some(Timestamp(2)));
        assert_eq!(b.agent_url.as_deref(), Some("http://a:1"));
        assert!(!ok(s.requeue(id, Attempt(2))), "finished builds stay finished");
    }

    /// A late result of the only attempt is accepted while the build waits.
    pub fn logs_are_kept_per_attempt<S: BuildStore>(s: &S) {
        let agent = ok(s.register_agent("http://a:1", None, Timestamp(0)));
        let id = ok(s.create_build(&new_build("x"), Timestamp(0))).id;
        ok(s.start_attempt(id, &agent, Timestamp(1)));
        assert!(ok(s.requeue(id, Attempt(1))));
        let failed = Completion {
            exit_code: 3,
            stdout: "o".into(),
            stderr: "e".into(),
        };
        assert!(
            ok(s.finish(id, Attempt(1), &failed, Timestamp(2))),
            "queued, not re-dispatched"
        );
        assert_eq!(ok(s.queued_builds(10)), vec![], "finished builds leave the queue");
        let log = ok(s.log(id, None)).unwrap_or_default();
        assert_eq!(
            (log.attempt, log.stdout.as_str(), log.stderr.as_str()),
            (Attempt(1), "o", "e")
        );
        assert_eq!(ok(s.log(id, Some(Attempt(2)))), None);
        let b = ok(s.build(id)).map(|b| (b.status, b.exit_code));
        assert_eq!(b, Some((BuildStatus::Failed, Some(3))));
    }

    /// Registration hands out new ids and replaces same-URL agents.
    pub fn agents_register_and_replace<S: BuildStore>(s: &S) {
        let a = ok(s.register_agent("http://a:1", None, Timestamp(0)));
        let b = ok(s.register_agent("http://b:1", None, Timestamp(0)));
        let a2 = ok(s.register_agent("http://a:1", Some("s3cret"), Timestamp(5)));
        assert!(a2.id > b.id && b.id > a.id);
        let urls: Vec<_> = ok(s.agents()).into_iter().map(|r| (r.id, r.url)).collect();
        assert_eq!(
            urls,
            vec![(b.id, "http://b:1".into()), (a2.id, "http://a:1".into())]
        );
        ok(s.remove_agent(b.id));
        ok(s.remove_agent(b.id));
        assert_eq!(ok(s.agents()).len(), 1);
    }

    /// Listing is newest first and pages.
    pub fn listing_is_newest_first<S: BuildStore>(s: &S) {
        let ids: Vec<_> = (0..7)
            .map(|i| ok(s.create_build(&new_build("x"), Timestamp(i))).id)
            .collect();
        let page = |limit, offset, before| -> Vec<BuildId> {
            ok(s.list_builds(Page {
                limit,
                offset,
                before,
            }))
            .iter()
            .map(|b| b.id)
            .collect()
        };
        assert_eq!(page(3, 0, None), vec![ids[6], ids[5], ids[4]]);
        assert_eq!(page(3, 6, None), vec![ids[0]]);
        assert_eq!(page(3, 10, None), vec![]);
        assert_eq!(page(2, 0, Some(ids[4])), vec![ids[3], ids[2]], "keyset");
        assert_eq!(page(2, 1, Some(ids[4])), vec![ids[2], ids[1]]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_store_conforms() {
        conformance::run_all(MemoryStore::new);
    }
}
