//! How to open the database: durability and lock waits.

use std::str::FromStr;
use std::time::Duration;

/// SQLite's `synchronous` setting, which trades commit latency for what a
/// committed transaction survives.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub enum Synchronous {
    /// No fsync: survives a process crash only if the OS does not crash.
    Off,
    /// fsync at checkpoints: survives process crashes; a power loss may lose
    /// the latest commits but not corrupt the file. The default.
    #[default]
    Normal,
    /// fsync on every commit: also survives power loss.
    Full,
}

impl Synchronous {
    pub(crate) fn pragma(self) -> &'static str {
        match self {
            Synchronous::Off => "OFF",
            Synchronous::Normal => "NORMAL",
            Synchronous::Full => "FULL",
        }
    }
}

impl FromStr for Synchronous {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "off" => Ok(Synchronous::Off),
            "normal" => Ok(Synchronous::Normal),
            "full" => Ok(Synchronous::Full),
            _ => Err(format!("expected off, normal or full, got {s:?}")),
        }
    }
}

/// How to open the database.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Options {
    /// Durability of commits.
    pub synchronous: Synchronous,
    /// How long to wait for a lock held by another process.
    pub busy_timeout: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            synchronous: Synchronous::Normal,
            busy_timeout: Duration::from_secs(5),
        }
    }
}
