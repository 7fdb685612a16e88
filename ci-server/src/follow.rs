//! `GET /api/builds/{id}/steps/{step}/log?follow=1` (and the build's log,
//! for a build of one step): the log as Server-Sent Events while the step
//! runs, ending when it ends.
//!
//! Events: `stdout` and `stderr` (text), `attempt` (a new attempt started;
//! its log follows), and `end` (`{"status", "exitCode"}`), after which the
//! stream closes. The stream reads the stored pieces and wakes on the
//! coordinator's events, so it never misses output and never repeats it.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::time::Duration;

use ci_core::coordinator::Event;
use ci_core::{Attempt, StepId, Stream};
use futures_util::StreamExt;
use tokio::sync::broadcast;
use warp::reply::Response;
use warp::sse::Event as Sse;
use warp::Reply;

use crate::api::App;

struct Follow {
    app: App,
    id: StepId,
    events: broadcast::Receiver<Event>,
    attempt: Attempt,
    after: Option<u64>,
    /// Bytes of stdout and stderr sent for the current attempt.
    sent: [usize; 2],
    queue: VecDeque<Sse>,
    /// The rest of a finished attempt's log, read a chunk at a time, and
    /// the event that ends the stream after it.
    tail: VecDeque<(Stream, crate::logs::TextStream)>,
    end: Option<Sse>,
    done: bool,
}

fn slot(s: Stream) -> usize {
    match s {
        Stream::Stdout => 0,
        Stream::Stderr => 1,
    }
}

fn name(s: Stream) -> &'static str {
    match s {
        Stream::Stdout => "stdout",
        Stream::Stderr => "stderr",
    }
}

/// The SSE reply for step `id`.
pub(crate) fn reply(app: App, id: StepId) -> Response {
    let events = app.dispatcher.subscribe();
    let state = Follow {
        app,
        id,
        events,
        attempt: Attempt(0),
        after: None,
        sent: [0, 0],
        queue: VecDeque::new(),
        tail: VecDeque::new(),
        end: None,
        done: false,
    };
    let stream = futures_util::stream::unfold(state, |mut f| async move {
        loop {
            if let Some(ev) = f.queue.pop_front() {
                return Some((Ok::<_, Infallible>(ev), f));
            }
            if let Some((stream, chunks)) = f.tail.front_mut() {
                let stream = *stream;
                match chunks.next().await {
                    Some(Ok(text)) => return Some((Ok(Sse::default().event(name(stream)).data(text)), f)),
                    Some(Err(e)) => {
                        tracing::warn!(cause = %e, "cannot read the rest of a log");
                        f.tail.clear();
                    }
                    None => {
                        f.tail.pop_front();
                    }
                }
                continue;
            }
            if let Some(end) = f.end.take() {
                return Some((Ok(end), f));
            }
            if f.done {
                return None;
            }
            f.fill().await;
        }
    });
    warp::sse::reply(
        warp::sse::keep_alive()
            .interval(Duration::from_secs(15))
            .stream(sync_wrapper::SyncStream::new(stream)),
    )
    .into_response()
}

impl Follow {
    /// Queues what is new, or waits for something to happen.
    async fn fill(&mut self) {
        let store = &self.app.store;
        let build = match store.step(self.id).await {
            Ok(Some(s)) => s,
            _ => {
                self.queue
                    .push_back(Sse::default().event("error").data("the step is gone"));
                self.done = true;
                return;
            }
        };
        if build.attempt != self.attempt {
            if build.attempt.0 > 1 || self.attempt.0 > 0 {
                self.queue
                    .push_back(Sse::default().event("attempt").data(build.attempt.to_string()));
            }
            self.attempt = build.attempt;
            self.after = None;
            self.sent = [0, 0];
        }
        if build.status.is_finished() {
            // The final log replaces the pieces: send what was not sent yet,
            // a chunk at a time.
            if let Ok(Some(info)) = store.log_info(self.id, Some(self.attempt)).await {
                for stream in [Stream::Stdout, Stream::Stderr] {
                    let from = self.sent[slot(stream)] as u64;
                    let chunks = crate::logs::text(store.clone(), self.id, info, stream, from);
                    self.tail.push_back((stream, chunks));
                }
            }
            let end = serde_json::json!({ "status": build.status, "exitCode": build.exit_code });
            self.end = Some(Sse::default().event("end").data(end.to_string()));
            self.done = true;
            return;
        }
        if self.attempt.0 > 0 {
            if let Ok(pieces) = store.log_pieces(self.id, self.attempt, self.after, 256).await {
                for p in pieces {
                    self.after = Some(p.seq);
                    self.sent[slot(p.stream)] += p.data.len();
                    self.queue
                        .push_back(Sse::default().event(name(p.stream)).data(p.data));
                }
            }
        }
        if !self.queue.is_empty() {
            return;
        }
        // Nothing new: wait for this step's next event (or re-check after a
        // while, in case events were missed).
        let id = self.id;
        let wait = async {
            loop {
                match self.events.recv().await {
                    Ok(
                        Event::Output(s)
                        | Event::Started { step: s, .. }
                        | Event::Requeued { step: s, .. }
                        | Event::StepFinished { step: s, .. },
                    ) if s == id => return,
                    Ok(_) => continue,
                    Err(broadcast::error::RecvError::Lagged(_)) => return,
                    Err(broadcast::error::RecvError::Closed) => return std::future::pending().await,
                }
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(2), wait).await;
    }
}
