//! Exponential backoff with a cap and jitter, as a validated value.
//!
//! Agents use it to retry registration, heartbeats that failed to connect,
//! and result delivery while the server is unreachable. Jitter spreads out
//! agents that started failing at the same moment (a server restart), so
//! they do not come back as a herd.

use std::time::Duration;

use crate::error::{Error, Result};

/// A retry policy: the n-th retry waits `min(cap, initial * factor^n)`,
/// shortened by a random fraction of at most `jitter`.
#[derive(Copy, Clone, Debug, PartialEq)]
pub struct Backoff {
    initial: Duration,
    cap: Duration,
    factor: f64,
    jitter: f64,
}

impl Backoff {
    /// A policy starting at `initial` and never waiting longer than `cap`,
    /// doubling each time, with 50% jitter.
    pub fn new(initial: Duration, cap: Duration) -> Result<Backoff> {
        if initial.is_zero() {
            return Err(Error::invalid("backoff", "initial delay must be positive"));
        }
        if cap < initial {
            return Err(Error::invalid(
                "backoff",
                "cap must be at least the initial delay",
            ));
        }
        Ok(Backoff {
            initial,
            cap,
            factor: 2.0,
            jitter: 0.5,
        })
    }

    /// Sets the growth factor, which must be at least 1.
    pub fn with_factor(mut self, factor: f64) -> Result<Backoff> {
        if !(factor.is_finite() && factor >= 1.0) {
            return Err(Error::invalid("backoff", "factor must be a number >= 1"));
        }
        self.factor = factor;
        Ok(self)
    }

    /// Sets the jitter: the largest fraction (0 to 1) by which a delay is
    /// randomly shortened. 0 gives exact delays; 1 gives "full jitter".
    pub fn with_jitter(mut self, jitter: f64) -> Result<Backoff> {
        if !(0.0..=1.0).contains(&jitter) {
            return Err(Error::invalid("backoff", "jitter must be between 0 and 1"));
        }
        self.jitter = jitter;
        Ok(self)
    }

    /// The longest any delay can be.
    pub fn cap(&self) -> Duration {
        self.cap
    }

    /// The delay before retry number `retry` (0-based), before jitter.
    pub fn base_delay(&self, retry: u32) -> Duration {
        let exp = self.factor.powi(i32::try_from(retry).unwrap_or(i32::MAX));
        let secs = self.initial.as_secs_f64() * exp;
        if !secs.is_finite() || secs >= self.cap.as_secs_f64() {
            self.cap
        } else {
            Duration::from_secs_f64(secs)
        }
    }

    /// The delay before retry number `retry`, with jitter drawn from `rng`.
    pub fn delay(&self, retry: u32, rng: &mut fastrand::Rng) -> Duration {
        let base = self.base_delay(retry);
        base.mul_f64(1.0 - self.jitter * rng.f64())
    }

    /// An endless sequence of delays, with jitter from `rng`.
    pub fn delays(self, rng: fastrand::Rng) -> Delays {
        Delays {
            policy: self,
            retry: 0,
            rng,
        }
    }
}

impl Default for Backoff {
    /// 100 ms doubling to a 5 s cap, 50% jitter.
    fn default() -> Self {
        Backoff {
            initial: Duration::from_millis(100),
            cap: Duration::from_secs(5),
            factor: 2.0,
            jitter: 0.5,
        }
    }
}

/// The delays of a [`Backoff`], one per retry.
#[derive(Debug, Clone)]
pub struct Delays {
    policy: Backoff,
    retry: u32,
    rng: fastrand::Rng,
}

impl Delays {
    /// Starts over from the initial delay, after a success.
    pub fn reset(&mut self) {
        self.retry = 0;
    }
}

impl Iterator for Delays {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let d = self.policy.delay(self.retry, &mut self.rng);
        self.retry = self.retry.saturating_add(1);
        Some(d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn grows_exponentially_up_to_the_cap() {
        let b = Backoff::new(ms(100), ms(1000)).unwrap().with_jitter(0.0).unwrap();
        let got: Vec<_> = b.delays(fastrand::Rng::with_seed(1)).take(6).collect();
        assert_eq!(got, [ms(100), ms(200), ms(400), ms(800), ms(1000), ms(1000)]);
        assert_eq!(b.base_delay(u32::MAX), ms(1000));
    }

    #[test]
    fn jitter_stays_within_bounds_and_spreads_delays() {
        let b = Backoff::new(ms(100), ms(1000)).unwrap().with_jitter(0.5).unwrap();
        let mut rng = fastrand::Rng::with_seed(7);
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..1000 {
            let d = b.delay(3, &mut rng);
            assert!(d > ms(400) && d <= ms(800), "{d:?}");
            seen.insert(d.as_millis());
        }
        assert!(
            seen.len() > 100,
            "delays should spread, got {} distinct",
            seen.len()
        );
    }

    #[test]
    fn same_seed_same_delays() {
        let b = Backoff::default();
        let a: Vec<_> = b.delays(fastrand::Rng::with_seed(9)).take(10).collect();
        let c: Vec<_> = b.delays(fastrand::Rng::with_seed(9)).take(10).collect();
        assert_eq!(a, c);
    }

    #[test]
    fn reset_starts_over() {
        let b = Backoff::new(ms(10), ms(100)).unwrap().with_jitter(0.0).unwrap();
        let mut d = b.delays(fastrand::Rng::with_seed(1));
        d.next();
        d.next();
        d.reset();
        assert_eq!(d.next(), Some(ms(10)));
    }

    #[test]
    fn refuses_nonsense() {
        assert!(Backoff::new(Duration::ZERO, ms(1)).is_err());
        assert!(Backoff::new(ms(10), ms(1)).is_err());
        assert!(Backoff::default().with_factor(0.5).is_err());
        assert!(Backoff::default().with_factor(f64::NAN).is_err());
        assert!(Backoff::default().with_jitter(1.5).is_err());
    }
}
