//! The object store against a directory and against a real S3 server
//! (`s3s-fs`, which keeps its objects on disk, serving the S3 protocol on
//! 127.0.0.1 from this process): the same checks on both.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic

use std::path::Path;

use ci_store::objects::{Listed, Objects};
use ci_store::Error;
use sha2::Digest;

const ACCESS: &str = "ci-test-access";
const SECRET: &str = "ci-test-secret-key";

/// A real S3 server on 127.0.0.1 storing under `root`, with one bucket
/// (`ci-objects`); returns its port.
async fn s3_server(root: &Path) -> u16 {
    std::fs::create_dir_all(root.join("ci-objects")).unwrap();
    let fs = s3s_fs::FileSystem::new(root).unwrap();
    let mut builder = s3s::service::S3ServiceBuilder::new(fs);
    builder.set_auth(s3s::auth::SimpleAuth::from_single(ACCESS, SECRET));
    let service = builder.build();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((socket, _)) = listener.accept().await else {
                return;
            };
            let service = service.clone();
            tokio::spawn(async move {
                let io = hyper_util::rt::TokioIo::new(socket);
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(io, service)
                    .await;
            });
        }
    });
    port
}

fn s3(port: u16, prefix: &str) -> Objects {
    let endpoint = format!("http://127.0.0.1:{port}");
    Objects::open_with(
        &format!("s3://ci-objects/{prefix}"),
        &[
            ("aws_access_key_id", ACCESS),
            ("aws_secret_access_key", SECRET),
            ("aws_region", "us-east-1"),
            ("aws_endpoint", &endpoint),
            ("aws_allow_http", "true"),
        ],
    )
    .unwrap()
}

/// A file of `n` bytes that do not repeat, and their SHA-256.
fn random_file(path: &Path, n: usize) -> String {
    let mut rng = fastrand::Rng::with_seed(n as u64);
    let data: Vec<u8> = (0..n).map(|_| rng.u8(..)).collect();
    std::fs::write(path, &data).unwrap();
    sha2::Sha256::digest(&data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

async fn the_same_on_every_store(objects: &Objects, scratch: &Path) {
    // Small objects, whole and in ranges.
    let stored = objects
        .put("logs/1/1", bytes::Bytes::from_static(b"hello, world"))
        .await
        .unwrap();
    assert_eq!(stored.size, 12);
    assert_eq!(objects.get("logs/1/1").await.unwrap().as_ref(), b"hello, world");
    assert_eq!(objects.size("logs/1/1").await.unwrap(), Some(12));
    assert_eq!(
        objects.get_range("logs/1/1", 7..12).await.unwrap().as_ref(),
        b"world"
    );
    assert_eq!(
        objects.get_range("logs/1/1", 7..100).await.unwrap().as_ref(),
        b"world"
    );
    assert!(objects.get_range("logs/1/1", 50..60).await.unwrap().is_empty());

    // A file larger than a part goes up in parts and comes back whole.
    let big = scratch.join("big");
    let sha = random_file(&big, 20 * 1024 * 1024 + 17);
    let stored = objects.put_file("artifacts/7/big.bin", &big).await.unwrap();
    assert_eq!(
        (stored.size, stored.sha256.as_str()),
        (20 * 1024 * 1024 + 17, sha.as_str())
    );
    let back = scratch.join("back");
    let n = objects.get_file("artifacts/7/big.bin", &back).await.unwrap();
    assert_eq!(n, stored.size);
    assert_eq!(std::fs::read(&back).unwrap(), std::fs::read(&big).unwrap());

    // Listing under a prefix, without the store's own.
    let mut listed = objects.list("logs").await.unwrap();
    listed.sort_by(|a, b| a.key.cmp(&b.key));
    assert_eq!(
        listed,
        vec![Listed {
            key: "logs/1/1".into(),
            size: 12
        }]
    );

    // Gone once deleted; deleting twice is no error.
    objects.delete("logs/1/1").await.unwrap();
    objects.delete("logs/1/1").await.unwrap();
    assert_eq!(objects.size("logs/1/1").await.unwrap(), None);
    assert!(matches!(objects.get("logs/1/1").await, Err(Error::NoObject(_))));
    assert!(matches!(
        objects.get_file("logs/1/1", &scratch.join("none")).await,
        Err(Error::NoObject(_))
    ));
    assert!(
        !scratch.join("none").exists(),
        "no file left from a failed download"
    );

    // Keys are checked before they reach a path or a request.
    for bad in ["../escape", "a//b", "/abs", "x y"] {
        assert!(
            matches!(
                objects.put(bad, bytes::Bytes::new()).await,
                Err(Error::InvalidKey(_))
            ),
            "{bad}"
        );
    }
    // A failed upload stores nothing.
    assert!(objects
        .put_file("artifacts/7/missing", &scratch.join("missing"))
        .await
        .is_err());
    assert_eq!(objects.size("artifacts/7/missing").await.unwrap(), None);
}

#[tokio::test]
async fn a_directory() {
    let dir = tempfile::tempdir().unwrap();
    let objects = Objects::open(dir.path().join("objects").to_str().unwrap()).unwrap();
    the_same_on_every_store(&objects, dir.path()).await;
    // Nothing of a part or a temporary name is left beside the objects.
    let left: Vec<_> = walk(&dir.path().join("objects"));
    assert_eq!(
        left,
        vec![dir.path().join("objects/artifacts/7/big.bin")],
        "{left:?}"
    );
}

#[tokio::test]
async fn a_real_s3_server() {
    let dir = tempfile::tempdir().unwrap();
    let port = s3_server(&dir.path().join("s3")).await;
    let objects = s3(port, "team-a");
    the_same_on_every_store(&objects, dir.path()).await;
    // The prefix is where the objects are, on the server's disk.
    assert!(dir
        .path()
        .join("s3/ci-objects/team-a/artifacts/7/big.bin")
        .exists());
    // Another prefix sees none of them.
    assert!(s3(port, "team-b").list("artifacts").await.unwrap().is_empty());
}

#[tokio::test]
async fn an_unreachable_s3_server_is_an_error_not_a_hang() {
    let port = ci_testkit::free_port();
    let objects = s3(port, "");
    // N.B.: a bound against a hang, not a measurement.
    let put = objects.put("a", bytes::Bytes::from_static(b"x"));
    let e = tokio::time::timeout(std::time::Duration::from_secs(120), put)
        .await
        .expect("an answer, not a hang")
        .unwrap_err();
    assert!(matches!(e, Error::Objects { .. }), "{e}");
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(walk(&path));
        } else {
            files.push(path);
        }
    }
    files
}
