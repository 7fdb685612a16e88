//! Runners: what actually runs a build.
//!
//! A [`Runner`] takes a [`Job`], writes the build's output to a [`LogSink`]
//! and returns the exit code. `ci-agent` provides a shell runner and a
//! Docker runner; embedders can bring their own. [`execute`] wraps any
//! runner with the timeout and turns every outcome into a [`Completion`].

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::mpsc;

use crate::error::Result;
use crate::model::{
    limits, Attempt, BuildId, CommitRef, Completion, DispatchId, ImageRef, Labels, RepoUrl, Service, StepId,
};
use crate::protocol::BuildRequest;

/// One attempt of a build, as a runner sees it: every value already
/// validated, so no runner parses a string again.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Job {
    /// The attempt as the wire names it: the `id` the server sent, which
    /// every message about it echoes.
    pub id: DispatchId,
    /// The step, as the API shows it (the server's `stepId`; a server that
    /// does not send it numbers its builds with `id`).
    pub step: StepId,
    /// The build, if the server says (else the step's id stands for it).
    pub build: Option<BuildId>,
    /// The step's name, if the server says.
    pub name: Option<String>,
    /// The attempt, if the server numbers them.
    pub attempt: Option<Attempt>,
    /// Repository to check out.
    pub repo: RepoUrl,
    /// Commit or ref to check out.
    pub commit: CommitRef,
    /// Shell command.
    pub command: String,
    /// Container image, for runners that use one.
    pub image: Option<ImageRef>,
    /// Time limit; the runner's default applies when `None`.
    pub timeout: Option<Duration>,
    /// Containers to run beside it, reachable by name (runners that run
    /// containers).
    pub services: Vec<Service>,
    /// Secrets, as environment variables; masked in its output.
    pub secrets: crate::protocol::SecretEnv,
}

impl Job {
    /// The job a dispatch asks for, if every value in it is valid, with
    /// repositories limited to `schemes`.
    pub fn from_request<S: AsRef<str>>(r: &BuildRequest, schemes: &[S]) -> Result<Job> {
        if r.command.trim().is_empty() {
            return Err(crate::Error::invalid("command", "must not be empty"));
        }
        if r.secrets.0.len() > crate::model::limits::MAX_SECRETS {
            return Err(crate::Error::invalid("secrets", "too many"));
        }
        for (name, value) in &r.secrets.0 {
            crate::project::SecretName::check(name)?;
            if value.contains('\0') {
                return Err(crate::Error::invalid("secrets", format!("{name} holds NUL")));
            }
        }
        Ok(Job {
            secrets: r.secrets.clone(),
            id: r.id,
            step: r.step_id.unwrap_or(StepId(r.id.0)),
            build: r.build,
            name: r.step.clone(),
            attempt: r.attempt,
            repo: RepoUrl::parse_with(&r.repo, schemes)?,
            commit: CommitRef::parse(&r.hash)?,
            command: r.command.clone(),
            image: r.image.as_deref().map(ImageRef::parse).transpose()?,
            timeout: r.timeout_ms.map(Duration::from_millis),
            services: {
                Service::validate_all(&r.services)?;
                r.services.clone()
            },
        })
    }
}

/// Why a runner could not run a build. The variant says what to do.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// This build cannot run, wherever it goes: its commit is not in the
    /// repository, its image does not exist. It fails, with this reason.
    #[error("{0}")]
    Setup(String),
    /// The machinery failed, not the build: the container engine is down,
    /// the disk is full. The attempt goes back to the queue for another
    /// agent.
    #[error("{0}")]
    Infra(String),
}

/// Runs builds.
///
/// N.B.: dropping the future returned by [`Runner::run`] must stop the
/// build and release what it holds (kill the process group, remove the
/// container). That is how timeouts and abandoned attempts stop work.
#[async_trait]
pub trait Runner: Send + Sync + 'static {
    /// How many builds it may run at once.
    fn capacity(&self) -> u32 {
        1
    }

    /// What it can run, for steps that ask for labels.
    fn labels(&self) -> Labels {
        Labels::default()
    }

    /// Runs `job` to the end and returns its exit code.
    async fn run(&self, job: &Job, log: &LogSink) -> Result<i32, RunError>;

    /// Housekeeping, called by the agent every few seconds while it runs
    /// (for example, removing what dead peers left behind).
    async fn maintain(&self) {}

    /// Called once when the agent stops: release whatever is still held.
    async fn shutdown(&self) {}
}

/// Exit code reported for a build that ran out of time (as `timeout(1)`).
pub const TIMED_OUT: i32 = 124;

/// How an attempt ended on its runner.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// It ran (or could not, for a reason of its own): report this result.
    Completed(Completion),
    /// The machinery failed: give the attempt back, with this reason.
    HandBack(String),
}

/// Runs `job` on `runner` within its timeout, but never longer than
/// `max_timeout` (the runner's own limit). A [`RunError::Setup`] or a
/// timeout becomes a failed completion with the reason on stderr; a
/// [`RunError::Infra`] becomes [`Outcome::HandBack`].
pub async fn execute(runner: &dyn Runner, job: &Job, log: &LogSink, max_timeout: Duration) -> Outcome {
    let limit = job.timeout.map_or(max_timeout, |t| t.min(max_timeout));
    let exit_code = match tokio::time::timeout(limit, runner.run(job, log)).await {
        Ok(Ok(code)) => code,
        Ok(Err(RunError::Setup(why))) => {
            log.write(Stream::Stderr, format!("ci: {why}\n").as_bytes());
            Completion::NOT_RUN
        }
        Ok(Err(RunError::Infra(why))) => return Outcome::HandBack(log.mask(&why)),
        Err(_) => {
            let msg = format!(
                "ci: build timed out after {}\n",
                humantime::format_duration(limit)
            );
            log.write(Stream::Stderr, msg.as_bytes());
            TIMED_OUT
        }
    };
    let (stdout, stderr) = log.contents();
    Outcome::Completed(Completion {
        exit_code,
        stdout,
        stderr,
    })
}

impl Outcome {
    /// The completion, or `None` for a hand-back.
    pub fn completion(self) -> Option<Completion> {
        match self {
            Outcome::Completed(c) => Some(c),
            Outcome::HandBack(_) => None,
        }
    }
}

/// An output stream of a build.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stream {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

/// A piece of output, in the order it was written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogChunk {
    /// Position of this chunk in the build's output, from 0.
    pub seq: u64,
    /// Which stream.
    pub stream: Stream,
    /// The bytes.
    pub data: Vec<u8>,
}

/// Collects a build's output, each stream capped at a size limit, and
/// optionally forwards it as it arrives.
///
/// Memory is bounded whatever the build prints: each stream keeps at most
/// its cap, nothing past the cap is forwarded, and live forwarding (a
/// bounded channel) stops for good when its reader falls behind, so live
/// output is always a prefix of the kept output. The final log carries the
/// rest.
#[derive(Clone, Debug)]
pub struct LogSink {
    inner: Arc<Mutex<Buffers>>,
    live: Option<mpsc::Sender<LogChunk>>,
}

#[derive(Debug, Default)]
struct Buffers {
    cap: usize,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    stdout_omitted: u64,
    stderr_omitted: u64,
    seq: u64,
    /// Live forwarding stopped: its reader fell behind.
    live_cut: bool,
    /// Secrets masked in stdout and stderr.
    masks: Option<Box<[crate::mask::Masker; 2]>>,
}

/// Room kept below [`limits::MAX_LOG`] for the truncation marker, so a
/// capped log with its marker still fits the store's limit.
const MARKER_ROOM: usize = 64;

/// How many chunks may wait for the live reader before live output stops.
pub const LIVE_BACKLOG: usize = 1024;

impl Default for LogSink {
    fn default() -> Self {
        LogSink::new(limits::MAX_LOG - MARKER_ROOM)
    }
}

impl LogSink {
    /// A sink keeping at most `cap` bytes per stream.
    pub fn new(cap: usize) -> LogSink {
        LogSink {
            inner: Arc::new(Mutex::new(Buffers {
                cap,
                ..Buffers::default()
            })),
            live: None,
        }
    }

    /// Also sends what is kept, numbered, to `tx` (make it with room for
    /// [`LIVE_BACKLOG`] chunks). If `tx` is full, live forwarding stops.
    pub fn with_live(mut self, tx: mpsc::Sender<LogChunk>) -> LogSink {
        self.live = Some(tx);
        self
    }

    /// Masks every occurrence of each of `values` as `***`, also one
    /// split across writes.
    pub fn with_secrets<V: AsRef<[u8]>>(self, values: impl IntoIterator<Item = V>) -> LogSink {
        let m = crate::mask::Masker::new(values);
        if !m.is_empty() {
            self.inner.lock().unwrap_or_else(PoisonError::into_inner).masks = Some(Box::new([m.clone(), m]));
        }
        self
    }

    /// `text` with the secrets masked: for messages that do not go
    /// through [`LogSink::write`].
    pub fn mask(&self, text: &str) -> String {
        let b = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        match &b.masks {
            Some(m) => m[0].mask_all(text),
            None => text.to_owned(),
        }
    }

    /// Appends output.
    pub fn write(&self, stream: Stream, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        let mut guard = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let b = &mut *guard;
        let masked;
        let data = match &mut b.masks {
            Some(m) => {
                masked = m[stream as usize].feed(data);
                if masked.is_empty() {
                    return;
                }
                masked.as_slice()
            }
            None => data,
        };
        let cap = b.cap;
        let (buf, omitted) = match stream {
            Stream::Stdout => (&mut b.stdout, &mut b.stdout_omitted),
            Stream::Stderr => (&mut b.stderr, &mut b.stderr_omitted),
        };
        let room = cap.saturating_sub(buf.len());
        let kept = &data[..data.len().min(room)];
        buf.extend_from_slice(kept);
        *omitted += (data.len() - kept.len()) as u64;
        let seq = b.seq;
        b.seq += 1;
        if let (Some(tx), false, false) = (&self.live, kept.is_empty(), b.live_cut) {
            let chunk = LogChunk {
                seq,
                stream,
                data: kept.to_vec(),
            };
            if let Err(mpsc::error::TrySendError::Full(_)) = tx.try_send(chunk) {
                // A closed receiver only means nobody watches live.
                tracing::warn!("live output fell behind; the rest comes with the result");
                b.live_cut = true;
            }
        }
    }

    /// The output so far, as text, with a marker where a stream was cut
    /// that says how many bytes were left out.
    pub fn contents(&self) -> (String, String) {
        let mut guard = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let b = &mut *guard;
        // What the maskers held back is no secret: the streams are done.
        if let Some(mut m) = b.masks.take() {
            for (i, stream) in [Stream::Stdout, Stream::Stderr].into_iter().enumerate() {
                let rest = m[i].finish();
                let cap = b.cap;
                let (buf, omitted) = match stream {
                    Stream::Stdout => (&mut b.stdout, &mut b.stdout_omitted),
                    Stream::Stderr => (&mut b.stderr, &mut b.stderr_omitted),
                };
                let room = cap.saturating_sub(buf.len());
                let kept = rest.len().min(room);
                buf.extend_from_slice(&rest[..kept]);
                *omitted += (rest.len() - kept) as u64;
            }
            b.masks = Some(m);
        }
        let b = &*b;
        let text = |buf: &[u8], mut omitted: u64| {
            let mut s = String::from_utf8_lossy(buf).into_owned();
            // Invalid bytes grow threefold as U+FFFD: cut back to the cap.
            if s.len() > b.cap {
                let mut cut = b.cap;
                while !s.is_char_boundary(cut) {
                    cut -= 1;
                }
                omitted += (s.len() - cut) as u64;
                s.truncate(cut);
            }
            if omitted > 0 {
                s.push_str(&format!("\n[output truncated: {omitted} bytes omitted]\n"));
            }
            s
        };
        (
            text(&b.stdout, b.stdout_omitted),
            text(&b.stderr, b.stderr_omitted),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    mockall::mock! {
        Run {}
        #[async_trait]
        impl Runner for Run {
            async fn run(&self, job: &Job, log: &LogSink) -> Result<i32, RunError>;
        }
    }

    fn job() -> Job {
        Job {
            secrets: Default::default(),
            id: DispatchId(1),
            step: StepId(1),
            build: None,
            name: None,
            attempt: Some(Attempt(1)),
            repo: RepoUrl::parse("/r").unwrap(),
            commit: CommitRef::parse("abcd").unwrap(),
            command: "true".into(),
            image: None,
            timeout: None,
            services: Vec::new(),
        }
    }

    #[test]
    fn caps_each_stream_and_numbers_chunks() {
        let (tx, mut rx) = mpsc::channel(LIVE_BACKLOG);
        let sink = LogSink::new(4).with_live(tx);
        sink.write(Stream::Stdout, b"abc");
        sink.write(Stream::Stderr, b"e");
        sink.write(Stream::Stdout, b"defg");
        let (out, err) = sink.contents();
        assert_eq!(out, "abcd\n[output truncated: 3 bytes omitted]\n");
        assert_eq!(err, "e");
        let seqs: Vec<_> = std::iter::from_fn(|| rx.try_recv().ok()).map(|c| c.seq).collect();
        assert_eq!(seqs, [0, 1, 2]);
    }

    #[test]
    fn memory_stays_bounded_whatever_the_build_prints() {
        let (tx, mut rx) = mpsc::channel(2);
        let sink = LogSink::new(10).with_live(tx);
        for _ in 0..1000 {
            sink.write(Stream::Stdout, b"0123");
        }
        let (out, _) = sink.contents();
        assert_eq!(out, "0123012301\n[output truncated: 3990 bytes omitted]\n");
        // The channel filled after two chunks; the third cut live output.
        let live: Vec<_> = std::iter::from_fn(|| rx.try_recv().ok()).collect();
        assert_eq!(live.len(), 2);
        assert_eq!(live[1].data, b"0123");
        // Invalid bytes are cut back to the cap after replacement.
        let sink = LogSink::new(6);
        sink.write(Stream::Stderr, &[0xff; 6]);
        let (_, err) = sink.contents();
        assert_eq!(err, "\u{fffd}\u{fffd}\n[output truncated: 12 bytes omitted]\n");
        // The default sink leaves room for its marker under the store's cap.
        let sink = LogSink::default();
        sink.write(Stream::Stdout, &vec![b'a'; limits::MAX_LOG + 1000]);
        let (out, _) = sink.contents();
        assert!(out.len() <= limits::MAX_LOG, "{}", out.len());
    }

    #[tokio::test]
    async fn runner_errors_become_failed_completions() {
        let mut r = MockRun::new();
        r.expect_run()
            .returning(|_, _| Err(RunError::Setup("checkout failed: no such commit".into())));
        let c = execute(&r, &job(), &LogSink::default(), Duration::from_secs(1))
            .await
            .completion()
            .unwrap();
        assert_eq!(c.exit_code, Completion::NOT_RUN);
        assert!(c.stderr.contains("checkout failed"), "{}", c.stderr);
    }

    #[tokio::test]
    async fn infrastructure_failures_hand_the_attempt_back() {
        let mut r = MockRun::new();
        r.expect_run()
            .returning(|_, _| Err(RunError::Infra("the Docker daemon is gone".into())));
        let out = execute(&r, &job(), &LogSink::default(), Duration::from_secs(1)).await;
        assert_eq!(out, Outcome::HandBack("the Docker daemon is gone".into()));
    }

    #[test]
    fn jobs_carry_validated_values() {
        let req = |repo: &str, hash: &str, command: &str| BuildRequest {
            secrets: Default::default(),
            id: DispatchId(1),
            step_id: Some(StepId(3)),
            command: command.into(),
            hash: hash.into(),
            repo: repo.into(),
            attempt: Some(Attempt(2)),
            image: Some("debian:bookworm".into()),
            timeout_ms: Some(1500),
            agent_id: None,
            build: None,
            step: None,
            services: Vec::new(),
        };
        let j = Job::from_request(&req("/srv/r", "main", "make"), &["file"]).unwrap();
        assert_eq!(
            (j.commit.as_str(), j.timeout),
            ("main", Some(Duration::from_millis(1500)))
        );
        assert_eq!(j.image.map(|i| i.to_string()).as_deref(), Some("debian:bookworm"));
        assert!(Job::from_request(&req("https://x/y", "main", "make"), &["file"]).is_err());
        assert!(Job::from_request(&req("/srv/r", "--upload-pack=x", "make"), &["file"]).is_err());
        assert!(Job::from_request(&req("/srv/r", "main", "  "), &["file"]).is_err());

        let service = |name: &str, env: &str| Service {
            name: name.into(),
            image: ImageRef::parse("redis:7").unwrap(),
            env: [(env.to_owned(), "1".to_owned())].into(),
            command: vec!["redis-server".into()],
        };
        let with = |services: Vec<Service>| BuildRequest {
            services,
            ..req("/srv/r", "main", "make")
        };
        let j = Job::from_request(&with(vec![service("cache", "A")]), &["file"]).unwrap();
        assert_eq!(j.services[0].name, "cache");
        for bad in [
            vec![service("-x", "A")],
            vec![service("a.b", "A")],
            vec![service("cache", "A B")],
            vec![service("cache", "A"), service("CACHE", "B")],
            (0..9).map(|i| service(&format!("s{i}"), "A")).collect(),
        ] {
            assert!(
                Job::from_request(&with(bad.clone()), &["file"]).is_err(),
                "{bad:?}"
            );
        }
    }

    #[tokio::test]
    async fn exit_code_and_output_pass_through() {
        let mut r = MockRun::new();
        r.expect_run().returning(|_, log| {
            log.write(Stream::Stdout, b"hello\n");
            Ok(3)
        });
        let c = execute(&r, &job(), &LogSink::default(), Duration::from_secs(1))
            .await
            .completion()
            .unwrap();
        assert_eq!((c.exit_code, c.stdout.as_str()), (3, "hello\n"));
    }

    struct Forever;

    #[async_trait]
    impl Runner for Forever {
        async fn run(&self, _: &Job, log: &LogSink) -> Result<i32, RunError> {
            log.write(Stream::Stdout, b"started\n");
            std::future::pending().await
        }
    }

    #[tokio::test(start_paused = true)]
    async fn timeouts_fail_the_build_with_a_message() {
        let mut j = job();
        j.timeout = Some(Duration::from_secs(90));
        let c = execute(&Forever, &j, &LogSink::default(), Duration::from_secs(3600))
            .await
            .completion()
            .unwrap();
        assert_eq!(c.exit_code, TIMED_OUT);
        assert_eq!(c.stdout, "started\n");
        assert!(c.stderr.contains("timed out after 1m 30s"), "{}", c.stderr);
        // The runner's own limit caps a longer one.
        let c = execute(&Forever, &j, &LogSink::default(), Duration::from_secs(30))
            .await
            .completion()
            .unwrap();
        assert!(c.stderr.contains("timed out after 30s"), "{}", c.stderr);
    }
}
