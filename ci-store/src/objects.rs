//! Where what is too large for the database goes (artifacts, caches, the
//! logs of finished steps): a directory, by default, or an S3-compatible
//! bucket, through the `object_store` crate.
//!
//! Every transfer streams: a file goes up in parts and comes down a chunk
//! at a time, so neither end holds more than a few parts of it in memory,
//! whatever its size. Nothing half-written is ever read: a directory's
//! object is written under a temporary name and renamed when complete, and
//! an S3 multipart upload is invisible until it is completed.
//!
//! Keys are checked before they reach a path or a request: letters,
//! digits and `._-+=` in `/`-separated segments, none of them `.` or `..`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures_util::StreamExt;
use object_store::path::Path as Key;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload, WriteMultipart};
use sha2::Digest;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::Error;

/// Bytes per part of an upload.
const PART: usize = 8 * 1024 * 1024;
/// Parts of one upload in flight at once: with [`PART`], at most 16 MiB of
/// a file in memory.
const IN_FLIGHT: usize = 2;
/// The longest key.
pub const MAX_KEY: usize = 1024;

/// An object store and the prefix every key is under. See the
/// [module docs](self).
#[derive(Clone, Debug)]
pub struct Objects {
    store: Arc<dyn ObjectStore>,
    prefix: String,
    describe: String,
}

/// What an upload stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stored {
    /// Its size in bytes.
    pub size: u64,
    /// Its SHA-256, in hex.
    pub sha256: String,
}

/// One object in a listing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Listed {
    /// Its key, without the store's prefix.
    pub key: String,
    /// Its size in bytes.
    pub size: u64,
}

/// True if `key` may name an object. See the [module docs](self).
pub fn valid_key(key: &str) -> bool {
    !key.is_empty()
        && key.len() <= MAX_KEY
        && key.split('/').all(|segment| {
            !segment.is_empty()
                && segment != "."
                && segment != ".."
                && segment
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-+=".contains(&b))
        })
}

impl Objects {
    /// The store `url` names: `s3://bucket` or `s3://bucket/prefix` (its
    /// credentials, region and endpoint from the usual `AWS_*` variables:
    /// `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`,
    /// `AWS_ENDPOINT_URL`, and `AWS_ALLOW_HTTP=true` for a plain-HTTP
    /// endpoint), or a directory (`file:///path`, or a plain path), made if
    /// missing.
    pub fn open(url: &str) -> Result<Objects, Error> {
        Objects::open_with(url, &[])
    }

    /// [`Objects::open`], with S3 settings given here (as `object_store`'s
    /// keys, e.g. `aws_endpoint`) over those of the environment.
    pub fn open_with(url: &str, settings: &[(&str, &str)]) -> Result<Objects, Error> {
        let invalid = |why: String| Error::ObjectStoreUrl {
            url: url.to_owned(),
            why,
        };
        if let Some(rest) = url.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            let prefix = prefix.trim_matches('/');
            if bucket.is_empty() {
                return Err(invalid("no bucket".into()));
            }
            if !prefix.is_empty() && !valid_key(prefix) {
                return Err(invalid(format!("{prefix:?} is not a valid prefix")));
            }
            // N.B.: an unreachable store is an error in seconds, not after
            // the crate's default of ten retries over three minutes: the
            // callers (a step's upload, log compaction) fail and try later.
            let retry = object_store::RetryConfig {
                max_retries: 3,
                retry_timeout: std::time::Duration::from_secs(30),
                ..Default::default()
            };
            let client = object_store::ClientOptions::new()
                .with_connect_timeout(std::time::Duration::from_secs(5))
                .with_timeout(std::time::Duration::from_secs(120));
            let mut builder = object_store::aws::AmazonS3Builder::from_env()
                .with_bucket_name(bucket)
                .with_retry(retry)
                .with_client_options(client);
            for (key, value) in settings {
                let key = key
                    .parse::<object_store::aws::AmazonS3ConfigKey>()
                    .map_err(|e| invalid(e.to_string()))?;
                builder = builder.with_config(key, *value);
            }
            let store = builder.build().map_err(|e| invalid(e.to_string()))?;
            return Ok(Objects {
                store: Arc::new(store),
                prefix: prefix.to_owned(),
                describe: format!("s3://{bucket}/{prefix}"),
            });
        }
        if url.contains("://") && !url.starts_with("file://") {
            return Err(invalid("not s3://, file:// or a directory".into()));
        }
        let dir = PathBuf::from(url.strip_prefix("file://").unwrap_or(url));
        if dir.as_os_str().is_empty() {
            return Err(invalid("no directory".into()));
        }
        std::fs::create_dir_all(&dir).map_err(|e| invalid(format!("cannot make {}: {e}", dir.display())))?;
        let store = object_store::local::LocalFileSystem::new_with_prefix(&dir)
            .map_err(|e| invalid(e.to_string()))?
            .with_automatic_cleanup(true);
        Ok(Objects {
            store: Arc::new(store),
            prefix: String::new(),
            describe: dir.display().to_string(),
        })
    }

    /// Where the objects are, for logs and errors (no credentials).
    pub fn describe(&self) -> &str {
        &self.describe
    }

    fn key(&self, key: &str) -> Result<Key, Error> {
        if !valid_key(key) {
            return Err(Error::InvalidKey(key.chars().take(MAX_KEY).collect()));
        }
        let full = match self.prefix.as_str() {
            "" => key.to_owned(),
            p => format!("{p}/{key}"),
        };
        Key::parse(&full).map_err(|_| Error::InvalidKey(key.to_owned()))
    }

    fn failed(key: &str) -> impl FnOnce(object_store::Error) -> Error + '_ {
        move |source| match source {
            object_store::Error::NotFound { .. } => Error::NoObject(key.to_owned()),
            source => Error::Objects {
                key: key.to_owned(),
                source,
            },
        }
    }

    /// Stores `bytes` at `key`, replacing what was there.
    pub async fn put(&self, key: &str, bytes: bytes::Bytes) -> Result<Stored, Error> {
        let stored = Stored {
            size: bytes.len() as u64,
            sha256: hex(&sha2::Sha256::digest(&bytes)),
        };
        self.store
            .put(&self.key(key)?, PutPayload::from(bytes))
            .await
            .map_err(Self::failed(key))?;
        Ok(stored)
    }

    /// Uploads the file at `path` to `key`, a part at a time: at most
    /// three 8 MiB parts of it in memory. Either all of it is stored, or
    /// nothing is.
    pub async fn put_file(&self, key: &str, path: &Path) -> Result<Stored, Error> {
        let name = self.key(key)?;
        let io = |e: std::io::Error| Error::ObjectIo {
            path: path.to_owned(),
            source: e,
        };
        let mut file = tokio::fs::File::open(path).await.map_err(io)?;
        let upload = self.store.put_multipart(&name).await.map_err(Self::failed(key))?;
        let mut writer = WriteMultipart::new_with_chunk_size(upload, PART);
        let mut hash = sha2::Sha256::new();
        let mut size = 0u64;
        let mut buf = vec![0u8; 256 * 1024];
        let read: Result<(), Error> = async {
            loop {
                let n = file.read(&mut buf).await.map_err(io)?;
                if n == 0 {
                    return Ok(());
                }
                writer
                    .wait_for_capacity(IN_FLIGHT)
                    .await
                    .map_err(Self::failed(key))?;
                hash.update(&buf[..n]);
                writer.write(&buf[..n]);
                size += n as u64;
            }
        }
        .await;
        if let Err(e) = read {
            // N.B.: nothing of it becomes visible.
            let _ = writer.abort().await;
            return Err(e);
        }
        writer.finish().await.map_err(Self::failed(key))?;
        Ok(Stored {
            size,
            sha256: hex(&hash.finalize()),
        })
    }

    /// Downloads `key` into a new file at `path`, a chunk at a time;
    /// returns its size. On failure the file is removed.
    pub async fn get_file(&self, key: &str, path: &Path) -> Result<u64, Error> {
        let name = self.key(key)?;
        let io = |e: std::io::Error| Error::ObjectIo {
            path: path.to_owned(),
            source: e,
        };
        let got = self.store.get(&name).await.map_err(Self::failed(key))?;
        let mut file = tokio::fs::File::create(path).await.map_err(io)?;
        let mut chunks = got.into_stream();
        let mut size = 0u64;
        let copied: Result<(), Error> = async {
            while let Some(chunk) = chunks.next().await {
                let chunk = chunk.map_err(Self::failed(key))?;
                file.write_all(&chunk).await.map_err(io)?;
                size += chunk.len() as u64;
            }
            file.flush().await.map_err(io)
        }
        .await;
        if let Err(e) = copied {
            drop(file);
            let _ = tokio::fs::remove_file(path).await;
            return Err(e);
        }
        Ok(size)
    }

    /// Bytes `range` of `key` (fewer past its end).
    pub async fn get_range(&self, key: &str, range: std::ops::Range<u64>) -> Result<bytes::Bytes, Error> {
        let name = self.key(key)?;
        let size = self
            .size(key)
            .await?
            .ok_or_else(|| Error::NoObject(key.to_owned()))?;
        let range = range.start.min(size)..range.end.min(size);
        if range.is_empty() {
            return Ok(bytes::Bytes::new());
        }
        self.store
            .get_range(&name, range)
            .await
            .map_err(Self::failed(key))
    }

    /// The whole of `key`, in memory: for small objects only.
    pub async fn get(&self, key: &str) -> Result<bytes::Bytes, Error> {
        let name = self.key(key)?;
        let got = self.store.get(&name).await.map_err(Self::failed(key))?;
        got.bytes().await.map_err(Self::failed(key))
    }

    /// The size of `key`, or `None` if there is no such object.
    pub async fn size(&self, key: &str) -> Result<Option<u64>, Error> {
        match self.store.head(&self.key(key)?).await {
            Ok(meta) => Ok(Some(meta.size)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(Self::failed(key)(e)),
        }
    }

    /// Removes `key`; removing what is not there is no error.
    pub async fn delete(&self, key: &str) -> Result<(), Error> {
        match self.store.delete(&self.key(key)?).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(Self::failed(key)(e)),
        }
    }

    /// Every object under `prefix` (a key's leading segments), in no
    /// particular order.
    pub async fn list(&self, prefix: &str) -> Result<Vec<Listed>, Error> {
        let under = self.key(prefix)?;
        let strip = match self.prefix.as_str() {
            "" => String::new(),
            p => format!("{p}/"),
        };
        let mut listing = self.store.list(Some(&under));
        let mut found = Vec::new();
        while let Some(meta) = listing.next().await {
            let meta = meta.map_err(Self::failed(prefix))?;
            let key = meta.location.to_string();
            found.push(Listed {
                key: key.strip_prefix(&strip).unwrap_or(&key).to_owned(),
                size: meta.size,
            });
        }
        Ok(found)
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_checked() {
        for ok in ["a", "logs/12/3.zst", "cache/p-1/cargo-ab12+=.tar"] {
            assert!(valid_key(ok), "{ok}");
        }
        for bad in [
            "", "/a", "a/", "a//b", "../a", "a/../b", "a/./b", "a b", "a\0b", "ä", "a\\b", "a:b",
        ] {
            assert!(!valid_key(bad), "{bad:?}");
        }
        assert!(!valid_key(&"a".repeat(MAX_KEY + 1)));
    }

    #[test]
    fn urls_are_checked() {
        for bad in ["s3://", "s3:///x", "http://example.com/x", "", "s3://b/../x"] {
            assert!(Objects::open(bad).is_err(), "{bad:?}");
        }
    }
}
