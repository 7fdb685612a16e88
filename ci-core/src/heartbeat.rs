//! The loops every agent runs, written once for `ci-agent` and
//! [`LocalCluster`](crate::LocalCluster) alike: a heartbeat every interval
//! for each running attempt, and a ping every interval while idle. Each
//! stops at the first definite refusal: the attempt no longer counts, or
//! the server no longer knows the agent.

use std::future::Future;
use std::time::Duration;

/// What one heartbeat or ping came to.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Beat {
    /// Taken.
    Alive,
    /// Not heard (the server is down or slow): keep going.
    Unheard,
    /// Refused for good: stop.
    Refused,
}

impl Beat {
    /// The beat an answer of the core comes to: taken, refused for good, or
    /// not heard (a transient error).
    pub fn of<T>(answer: &crate::Result<T>) -> Beat {
        match answer {
            Ok(_) => Beat::Alive,
            Err(e) if e.is_retryable() => Beat::Unheard,
            Err(_) => Beat::Refused,
        }
    }
}

/// Calls `beat` every `every` (late ones wait, none bunch up) until it
/// comes back [`Beat::Refused`]. The first comes one interval in: what
/// starts a loop (a dispatch, a registration) was itself a sign of life,
/// and a beat at once would cost the server a write per build for nothing.
pub async fn keep_alive<F, Fut>(every: Duration, mut beat: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Beat>,
{
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if beat().await == Beat::Refused {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[tokio::test(start_paused = true)]
    async fn beats_every_interval_until_refused() {
        let n = AtomicU32::new(0);
        let started = tokio::time::Instant::now();
        keep_alive(Duration::from_secs(1), || async {
            match n.fetch_add(1, Ordering::SeqCst) {
                0 | 2 => Beat::Alive,
                1 => Beat::Unheard,
                _ => Beat::Refused,
            }
        })
        .await;
        assert_eq!(n.load(Ordering::SeqCst), 4);
        assert_eq!(started.elapsed(), Duration::from_secs(4));
    }

    #[tokio::test(start_paused = true)]
    async fn the_first_beat_waits_one_interval() {
        let started = tokio::time::Instant::now();
        let mut at = Vec::new();
        keep_alive(Duration::from_secs(2), || {
            at.push(started.elapsed());
            async { Beat::Refused }
        })
        .await;
        assert_eq!(at, [Duration::from_secs(2)]);
    }
}
