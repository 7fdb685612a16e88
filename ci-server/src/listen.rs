//! Accepting connections, bounded: a header-read timeout (which also
//! closes idle keep-alive connections), a limit on open connections with a
//! clear log line when it is reached, and a graceful stop. warp's own
//! server has none of these, so a few hundred idle sockets used to take the
//! server's every file descriptor.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tower_service::Service;
use tracing::{debug, error, info, warn};
use warp::Filter;

/// File descriptors kept back from connections, for the database, the
/// requests to agents and the rest of the process.
const RESERVED_FDS: u64 = 64;

/// How many connections may wait to be accepted. A fleet reconnecting at
/// once (after a server restart) arrives faster than one accept loop takes
/// it: with tokio's default of 1,024, 18,500 agents connecting at 10,000 a
/// second saw thousands of connections dropped (`ListenOverflows`). The
/// kernel caps it at `net.core.somaxconn`.
pub const BACKLOG: u32 = 8192;

/// A listener on `addr` with room for [`BACKLOG`] connections waiting.
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(BACKLOG)
}

/// How the listener is bounded.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Most connections open at once; more are closed as they arrive.
    pub max_connections: usize,
    /// Time for a client to send a request's headers, and the longest a
    /// kept-alive connection may sit idle between requests.
    pub header_timeout: Duration,
}

impl Limits {
    /// What the process's file limit allows: its soft `RLIMIT_NOFILE` less
    /// a reserve, capped at `cap`.
    pub fn connections_allowed(cap: usize) -> usize {
        let soft = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
            .map_or(1024, |(soft, _)| soft);
        let room = usize::try_from(soft.saturating_sub(RESERVED_FDS)).unwrap_or(usize::MAX);
        room.clamp(1, cap.max(1))
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: Limits::connections_allowed(10_000),
            header_timeout: Duration::from_secs(10),
        }
    }
}

/// A body sent in place of a reply's own: warp builds bodies only in
/// memory, and a log may be too large for that. A handler attaches it to
/// its response with [`Streamed::attach`]; [`serve`] swaps it in.
#[derive(Clone)]
pub(crate) struct Streamed(Arc<std::sync::Mutex<Option<BodyStream>>>);

type BodyStream = futures_util::stream::BoxStream<'static, Result<bytes::Bytes, std::io::Error>>;

impl Streamed {
    /// Sends `stream` as the body of `response` when served by [`serve`].
    pub(crate) fn attach(response: &mut warp::reply::Response, stream: BodyStream) {
        response
            .extensions_mut()
            .insert(Streamed(Arc::new(std::sync::Mutex::new(Some(stream)))));
    }

    fn take(self) -> Option<BodyStream> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A warp response with its [`Streamed`] body, if it has one, swapped in.
fn unwrap_streamed(
    response: warp::reply::Response,
) -> hyper::Response<http_body_util::combinators::UnsyncBoxBody<bytes::Bytes, BoxError>> {
    use futures_util::TryStreamExt;
    use http_body_util::BodyExt;
    let (mut parts, body) = response.into_parts();
    let body = match parts.extensions.remove::<Streamed>().and_then(Streamed::take) {
        Some(stream) => {
            let frames = stream.map_ok(hyper::body::Frame::data).map_err(BoxError::from);
            http_body_util::StreamBody::new(frames).boxed_unsync()
        }
        None => body.map_err(BoxError::from).boxed_unsync(),
    };
    hyper::Response::from_parts(parts, body)
}

/// The peer of a connection, for handlers (warp's own `addr::remote` only
/// works under warp's server).
#[derive(Copy, Clone, Debug)]
struct Peer(SocketAddr);

/// The address a request came from: set by [`serve`], or by
/// `warp::test::request().remote_addr(..)` in tests.
pub(crate) fn remote() -> impl Filter<Extract = (Option<SocketAddr>,), Error = Infallible> + Copy {
    warp::ext::optional::<Peer>()
        .and(warp::addr::remote())
        .map(|peer: Option<Peer>, warp: Option<SocketAddr>| peer.map(|p| p.0).or(warp))
}

/// The upgrade of a request's connection, for the route that takes it
/// over (`GET /agent/connect`).
#[derive(Clone, Debug)]
pub(crate) struct Upgrade(pub(crate) Arc<std::sync::Mutex<Option<hyper::upgrade::OnUpgrade>>>);

/// Serves `filter` on `listener` until `shutdown` resolves, then stops
/// accepting and waits (up to 30 s) for the connections open to finish.
pub(crate) async fn serve<F>(
    listener: TcpListener,
    filter: F,
    limits: Limits,
    shutdown: impl Future<Output = ()> + Send,
) where
    F: Filter + Clone + Send + Sync + 'static,
    F::Extract: warp::Reply,
{
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    // Tells open connections to finish their request and close.
    let (stop, stopping) = tokio::sync::watch::channel(false);
    let mut refused = 0u64;
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends: the limit is set below the file
                    // limit, so this is another part of the process; wait.
                    error!(cause = %e, "cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            refused += 1;
            // The first refusal and then every thousandth, not every one.
            if refused % 1000 == 1 {
                warn!(
                    limit = limits.max_connections,
                    refused,
                    %peer,
                    "connection limit reached: refusing new connections until some close \
                     (idle ones close after {:?}); raise MAX_CONNECTIONS and the file limit (ulimit -n) \
                     if this is real load",
                    limits.header_timeout
                );
            }
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let service = warp::service(filter.clone());
        let handler = hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
            req.extensions_mut().insert(Peer(peer));
            // N.B.: hyper leaves a request's upgrade in its extensions, where
            // warp's filters cannot take it; the agents' connections do.
            if let Some(upgrade) = req.extensions_mut().remove::<hyper::upgrade::OnUpgrade>() {
                req.extensions_mut()
                    .insert(Upgrade(Arc::new(std::sync::Mutex::new(Some(upgrade)))));
            }
            let mut service = service.clone();
            async move { service.call(req).await.map(unwrap_streamed) }
        });
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_timeout)
            .serve_connection(TokioIo::new(stream), handler)
            .with_upgrades();
        let mut stopping = stopping.clone();
        tokio::spawn(async move {
            tokio::pin!(conn);
            let ended = tokio::select! {
                r = conn.as_mut() => r,
                _ = stopping.changed() => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = ended {
                debug!(%peer, cause = %e, "connection ended with an error");
            }
            drop(permit);
        });
    }
    info!("stopped accepting connections");
    let _ = stop.send(true);
    // Every connection holds a permit: all of them back means all closed.
    let all = u32::try_from(limits.max_connections).unwrap_or(u32::MAX);
    if tokio::time::timeout(Duration::from_secs(30), permits.acquire_many(all))
        .await
        .is_err()
    {
        warn!("connections still open after 30 s; stopping anyway");
    }
}
