//! The lease policy: how long a running attempt stays assigned without a
//! heartbeat. The leases themselves live in the store ([`crate::store::Lease`]).

use std::time::Duration;

use crate::clock::Timestamp;
use crate::error::{Error, Result};

/// The heartbeat contract between server and agents: agents send a
/// heartbeat every `interval`; after `missed` intervals without one, the
/// attempt is presumed dead and its build goes back to the queue.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct LeasePolicy {
    interval: Duration,
    missed: u32,
}

impl LeasePolicy {
    /// Validates the two settings.
    pub fn new(interval: Duration, missed: u32) -> Result<LeasePolicy> {
        if interval < Duration::from_millis(10) {
            return Err(Error::invalid("heartbeat interval", "must be at least 10 ms"));
        }
        if interval > Duration::from_secs(3600) {
            return Err(Error::invalid("heartbeat interval", "must be at most one hour"));
        }
        if missed == 0 || missed > 1000 {
            return Err(Error::invalid("missed heartbeats", "must be between 1 and 1000"));
        }
        Ok(LeasePolicy { interval, missed })
    }

    /// How often agents send heartbeats.
    pub fn interval(&self) -> Duration {
        self.interval
    }

    /// How many intervals may pass without a heartbeat.
    pub fn missed(&self) -> u32 {
        self.missed
    }

    /// How long a lease lasts after its last heartbeat.
    pub fn ttl(&self) -> Duration {
        self.interval * self.missed
    }

    /// The deadline of a lease renewed at `now`.
    pub fn deadline(&self, now: Timestamp) -> Timestamp {
        now.plus(self.ttl())
    }
}

impl Default for LeasePolicy {
    /// One heartbeat per second, five missed ones expire the lease.
    fn default() -> Self {
        LeasePolicy {
            interval: Duration::from_secs(1),
            missed: 5,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttl_is_interval_times_missed() {
        let p = LeasePolicy::new(Duration::from_millis(200), 3).unwrap();
        assert_eq!(p.ttl(), Duration::from_millis(600));
        assert_eq!(p.deadline(Timestamp(1000)), Timestamp(1600));
        let l = crate::store::Lease {
            step: crate::model::StepId(1),
            attempt: crate::model::Attempt(1),
            agent: crate::model::AgentId(1),
            expires_at: Timestamp(1600),
        };
        assert!(!l.is_expired(Timestamp(1599)));
        assert!(l.is_expired(Timestamp(1600)));
    }

    #[test]
    fn refuses_nonsense() {
        assert!(LeasePolicy::new(Duration::from_millis(1), 3).is_err());
        assert!(LeasePolicy::new(Duration::from_secs(1), 0).is_err());
        assert!(LeasePolicy::new(Duration::from_secs(7200), 1).is_err());
    }
}
