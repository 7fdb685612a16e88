//! Git for the ci build system, shared by the agent and the server: a
//! bare cache per repository, commits resolved to full SHAs, files read at
//! a commit, and workspaces checked out from the cache.
//!
//! # Layout
//! - [`Checkouts`] (`checkout`): the caches and the workspaces.
//! - [`Error`]: what can go wrong.
//!
//! N.B.: nothing a user sends reaches git unchecked: repositories are
//! validated [`ci_core::RepoUrl`]s passed after `--`, commits validated
//! [`ci_core::CommitRef`]s passed after `--end-of-options`.

#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};

mod checkout;

pub use checkout::{Checkouts, CommitInfo, Workspace};

/// What can go wrong.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file operation failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Git could not fetch or check out, or the commit is not there.
    #[error("{0}")]
    Checkout(String),
    /// The repository has no such commit (it was fetched).
    #[error("{0}")]
    NotFound(String),
    /// A file is larger than the caller reads.
    #[error("{0}")]
    TooLarge(String),
}

impl Error {
    /// An I/O error on `path`.
    pub fn io(path: impl AsRef<Path>, source: std::io::Error) -> Error {
        Error::Io {
            path: path.as_ref().to_path_buf(),
            source,
        }
    }
}
