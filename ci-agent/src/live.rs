//! Live output: forwards a build's output to the server while it runs, in
//! numbered pieces (`POST /notify_build_log`), batched every few hundred
//! milliseconds, cut only at UTF-8 character boundaries.

use std::time::Duration;

use ci_core::protocol::{NotifyBuildLog, WirePiece};
use ci_core::runner::LogChunk;
use ci_core::{AgentId, Attempt, DispatchId, Stream};
use tokio::sync::mpsc::Receiver;
use tracing::debug;

use crate::client::{CallError, ServerClient};

/// How often pieces are sent.
pub const FLUSH_EVERY: Duration = Duration::from_millis(250);
/// Largest batch, in bytes.
const MAX_BATCH: usize = 256 * 1024;

/// Splits bytes into text at character boundaries, holding back a
/// character cut in half until the rest of it arrives.
#[derive(Default)]
pub(crate) struct Utf8Splitter {
    pending: Vec<u8>,
}

impl Utf8Splitter {
    /// The text that is complete so far.
    pub(crate) fn push(&mut self, bytes: &[u8]) -> String {
        self.pending.extend_from_slice(bytes);
        let cut = match std::str::from_utf8(&self.pending) {
            Ok(_) => self.pending.len(),
            // An incomplete character at the end: keep it for later.
            Err(e) if e.error_len().is_none() => e.valid_up_to(),
            // Invalid bytes: replace them, as the final log does.
            Err(_) => self.pending.len(),
        };
        let rest = self.pending.split_off(cut);
        let text = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending = rest;
        text
    }

    /// Whatever is left, replacement characters and all.
    pub(crate) fn finish(&mut self) -> String {
        let text = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        text
    }
}

/// Forwards `rx` until it closes (the build ended) or the server refuses
/// (the attempt no longer runs). Pieces the server could not be reached for
/// are kept and sent with the next batch: the server ignores repeats, so
/// nothing is duplicated, and the final result carries the whole log anyway.
pub(crate) async fn forward(
    client: ServerClient,
    build: DispatchId,
    attempt: Option<Attempt>,
    agent: Option<AgentId>,
    mut rx: Receiver<LogChunk>,
) {
    let mut out = Utf8Splitter::default();
    let mut err = Utf8Splitter::default();
    let mut batch: Vec<WirePiece> = Vec::new();
    let mut seq = 0u64;
    let mut tick = tokio::time::interval(FLUSH_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut push = |batch: &mut Vec<WirePiece>, stream: Stream, data: String| {
        if !data.is_empty() {
            batch.push(WirePiece { seq, stream, data });
            seq += 1;
        }
    };
    loop {
        let closed = tokio::select! {
            chunk = rx.recv() => match chunk {
                Some(c) => {
                    let text = match c.stream {
                        Stream::Stdout => out.push(&c.data),
                        Stream::Stderr => err.push(&c.data),
                    };
                    push(&mut batch, c.stream, text);
                    if batch.iter().map(|p| p.data.len()).sum::<usize>() < MAX_BATCH {
                        continue;
                    }
                    false
                }
                None => {
                    push(&mut batch, Stream::Stdout, out.finish());
                    push(&mut batch, Stream::Stderr, err.finish());
                    true
                }
            },
            _ = tick.tick() => false,
        };
        if !batch.is_empty() {
            let body = NotifyBuildLog {
                id: build,
                attempt,
                agent_id: agent,
                pieces: batch.clone(),
            };
            match client.log(&body).await {
                Ok(()) => batch.clear(),
                Err(CallError::Refused { status, .. }) => {
                    debug!(%build, %status, "live output refused; the attempt no longer runs");
                    return;
                }
                // Keep the batch; the next flush tries again.
                Err(e) => debug!(%build, cause = %e, "live output not delivered yet"),
            }
        }
        if closed {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn characters_are_never_cut() {
        let mut s = Utf8Splitter::default();
        let bytes = "héllo €".as_bytes();
        let mut text = String::new();
        for b in bytes {
            text.push_str(&s.push(&[*b]));
        }
        assert_eq!(text, "héllo €");
        assert_eq!(s.push(&[0xe2, 0x82]), "", "half a euro sign is held back");
        assert_eq!(s.finish(), "\u{fffd}");
        assert_eq!(
            s.push(&[b'a', 0xff, b'b']),
            "a\u{fffd}b",
            "invalid bytes are replaced"
        );
    }
}
