//! Retrying a call with backoff until it succeeds or fails for good: how
//! agents (`ci-agent` and [`LocalCluster`](crate::LocalCluster) workers)
//! register and deliver results while the server is away.

use std::fmt::Display;
use std::future::Future;

use tracing::{debug, warn};

use crate::backoff::Backoff;

/// An error that may go away if the same call is made again later.
pub trait Transient {
    /// True if the same call may succeed later.
    fn is_transient(&self) -> bool;
}

impl Transient for crate::Error {
    fn is_transient(&self) -> bool {
        self.is_retryable()
    }
}

/// Calls `f` until it succeeds or fails for good, sleeping `backoff`
/// between transient failures. Logs the first failure and every tenth.
pub async fn retry<T, E, F, Fut>(what: &str, backoff: Backoff, mut f: F) -> Result<T, E>
where
    E: Transient + Display,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let mut delays = backoff.delays(fastrand::Rng::new());
    let mut failures = 0u32;
    loop {
        match f().await {
            Ok(v) => {
                if failures > 0 {
                    debug!(what, failures, "succeeded after retries");
                }
                return Ok(v);
            }
            Err(e) if e.is_transient() => {
                failures += 1;
                let delay = delays.next().unwrap_or(backoff.cap());
                if failures == 1 || failures.is_multiple_of(10) {
                    warn!(what, failures, cause = %e, retry_in = ?delay, "retrying");
                }
                tokio::time::sleep(delay).await;
            }
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn retries_transient_failures_only() {
        let backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(1)).unwrap();
        let mut calls = 0;
        let r: Result<u32, crate::Error> = retry("thing", backoff, || {
            calls += 1;
            let n = calls;
            async move {
                if n < 3 {
                    Err(crate::Error::Unavailable("down".into()))
                } else {
                    Ok(n)
                }
            }
        })
        .await;
        assert_eq!(r.ok(), Some(3));
        let mut calls = 0;
        let r: Result<(), crate::Error> = retry("thing", backoff, || {
            calls += 1;
            async { Err(crate::Error::invalid("x", "bad")) }
        })
        .await;
        assert!(r.is_err());
        assert_eq!(calls, 1, "a definite failure is not retried");
    }
}
