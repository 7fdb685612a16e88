//! Logs of any size in bounded memory. A log may hold 16 MiB per stream;
//! forty readers of one used to take the server from 154 MB to 1 GB,
//! because every answer loaded the whole log (twice, with its escaped
//! copy). Here a large log is read from the store a chunk at a time, off
//! the async threads, and sent as it is read: memory per reader is one
//! chunk, and a slow reader slows only its own reads.

use std::sync::Arc;

use bytes::Bytes;
use ci_core::protocol::LogView;
use ci_core::{Attempt, LogInfo, Step, StepId, Store, Stream};
use futures_util::stream::{self, StreamExt};
use warp::reply::{json, Response};
use warp::Reply;

use crate::api::ApiError;
use crate::listen::Streamed;

/// Bytes read from the store at a time.
const CHUNK: usize = 64 * 1024;
/// Rows of live pieces read at a time.
const PAGE: usize = 64;
/// Logs up to this size are answered from memory in one piece, which also
/// serves them through `Server::routes()` alone (larger ones stream only
/// under `Server::serve`).
pub(crate) const INLINE: u64 = 256 * 1024;

struct Reader {
    store: Arc<dyn Store>,
    id: StepId,
    info: LogInfo,
    stream: Stream,
    /// Bytes still to skip (pieces) or the next byte to read (a final log).
    skip: u64,
    offset: u64,
    after: Option<u64>,
    /// The start of a character cut at a chunk's end.
    carry: Vec<u8>,
    done: bool,
}

/// A text stream that is also `Sync`, as warp's SSE wants.
pub(crate) type TextStream =
    std::pin::Pin<Box<dyn futures_util::Stream<Item = ci_core::Result<String>> + Send + Sync>>;

/// One stream of a log as text, a chunk at a time, from byte `from`.
pub(crate) fn text(
    store: Arc<dyn Store>,
    id: StepId,
    info: LogInfo,
    stream: Stream,
    from: u64,
) -> TextStream {
    let reader = Reader {
        store,
        id,
        info,
        stream,
        skip: if info.complete { 0 } else { from },
        offset: if info.complete { from } else { 0 },
        after: None,
        carry: Vec::new(),
        done: false,
    };
    Box::pin(sync_wrapper::SyncStream::new(stream::try_unfold(
        reader,
        |mut r| async move {
            loop {
                if r.done {
                    return Ok(None);
                }
                let text = r.next().await?;
                if !text.is_empty() {
                    return Ok(Some((text, r)));
                }
            }
        },
    )))
}

impl Reader {
    /// The next piece of text; empty when a read held none of it.
    async fn next(&mut self) -> ci_core::Result<String> {
        let (store, id, attempt, stream) = (&self.store, self.id, self.info.attempt, self.stream);
        if self.info.complete {
            let bytes = store.read_log(id, attempt, stream, self.offset, CHUNK).await?;
            if bytes.is_empty() {
                self.done = true;
                return Ok(String::from_utf8_lossy(&std::mem::take(&mut self.carry)).into_owned());
            }
            self.offset += bytes.len() as u64;
            self.carry.extend_from_slice(&bytes);
            let cut = match std::str::from_utf8(&self.carry) {
                Ok(_) => self.carry.len(),
                // A character cut in half: keep its start for the next chunk.
                Err(e) if e.error_len().is_none() => e.valid_up_to(),
                Err(_) => self.carry.len(),
            };
            let rest = self.carry.split_off(cut);
            let text = String::from_utf8_lossy(&self.carry).into_owned();
            self.carry = rest;
            return Ok(text);
        }
        let page = store.log_pieces(id, attempt, self.after, PAGE).await?;
        let Some(last) = page.last() else {
            self.done = true;
            return Ok(String::new());
        };
        self.after = Some(last.seq);
        let mut text = String::new();
        for p in page.iter().filter(|p| p.stream == stream) {
            let skip = usize::try_from(self.skip).unwrap_or(usize::MAX).min(p.data.len());
            self.skip -= skip as u64;
            text.push_str(p.data.get(skip..).unwrap_or(""));
        }
        Ok(text)
    }
}

/// Text as the inside of a JSON string.
fn json_escaped(text: &str) -> String {
    let quoted = serde_json::Value::String(text.to_owned()).to_string();
    quoted[1..quoted.len() - 1].to_owned()
}

/// `GET /api/builds/{id}/steps/{step}/log`: the log of `attempt` (the
/// latest if `None`) of `step`, as a [`LogView`].
pub(crate) async fn json_reply(
    store: Arc<dyn Store>,
    step: Step,
    attempt: Option<Attempt>,
) -> Result<Response, ApiError> {
    let id = step.id;
    // N.B.: an attempt with no log at all is complete only if it never
    // ran (a step skipped, or canceled before its first dispatch); one that
    // ran and left nothing lost its agent, or was canceled, and says so.
    let asked = attempt.unwrap_or(step.attempt);
    let info = store.log_info(id, attempt).await?.unwrap_or(LogInfo {
        attempt: asked,
        complete: asked.0 == 0 && step.status.is_finished(),
        ..LogInfo::default()
    });
    if info.stdout_len + info.stderr_len <= INLINE {
        let log = store
            .log(id, Some(info.attempt))
            .await?
            .unwrap_or(ci_core::BuildLog {
                attempt: info.attempt,
                complete: info.complete,
                ..Default::default()
            });
        return Ok(json(&LogView::new(&step, log)).into_response());
    }
    let mut head = serde_json::json!({
        "id": step.build,
        "step": step.name,
        "attempt": info.attempt,
        "complete": info.complete,
    });
    if let Some(note) = LogView::note(&step, info.attempt, info.complete) {
        head["note"] = note.into();
    }
    let head = head.to_string();
    let open = format!("{},\"stdout\":\"", &head[..head.len() - 1]);
    let part = |s: Stream| {
        text(store.clone(), id, info, s, 0).map(|t| {
            t.map(|t| Bytes::from(json_escaped(&t)))
                .map_err(|e| std::io::Error::other(e.to_string()))
        })
    };
    let body = stream::once(async move { Ok(Bytes::from(open)) })
        .chain(part(Stream::Stdout))
        .chain(stream::once(async {
            Ok(Bytes::from_static(b"\",\"stderr\":\""))
        }))
        .chain(part(Stream::Stderr))
        .chain(stream::once(async { Ok(Bytes::from_static(b"\"}")) }))
        .boxed();
    let mut response = warp::reply::with_header(
        "{\"error\":\"this log is too large to answer without Server::serve\"}",
        "content-type",
        "application/json",
    )
    .into_response();
    Streamed::attach(&mut response, body);
    Ok(response)
}
