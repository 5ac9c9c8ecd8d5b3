//! Caps on upstream connections, per origin and in total, shared by every worker; and the
//! file-descriptor limit that has to cover them.
//!
//! Every upstream connection (an HTTP/1.1 connection in a worker's pool, a worker's h2
//! connection in `multiplex.rs`) holds a place under both caps for as long as it is open: the
//! dialer takes the places before it connects and the connection's socket carries them
//! ([`Capped`]). A request that needs a new connection while its origin (or the proxy) is at
//! the cap waits for a place up to `upstream.queue_timeout`, meanwhile taking any pooled
//! connection that comes free, then gets 503. Without the caps, 120 h2 clients × 200 streams
//! to an HTTP/1.1 origin opened 19,057 connections and ran out of descriptors.
//!
//! The cost is per new upstream connection (a map lookup, two semaphores), never per request
//! on a connection already open.

use std::io;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use hyper_util::client::legacy::connect::{Connected, Connection};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::UpstreamConfig;
use crate::metrics::Metrics;

/// No place for a new upstream connection came free in time.
#[derive(Debug, thiserror::Error)]
#[error("no upstream connection to {origin} came free within {waited} (upstream.max_connections_per_origin: {per_origin}, upstream.max_connections: {total})")]
pub struct Saturated {
    origin: String,
    waited: String,
    per_origin: usize,
    total: usize,
}

/// The caps; see the module documentation.
pub struct UpstreamCaps {
    total: Arc<Semaphore>,
    total_max: usize,
    per_origin: DashMap<String, Arc<Semaphore>>,
    per_origin_max: usize,
    queue: Duration,
}

/// A connection's places under both caps, given back when it closes.
pub struct Places {
    _total: OwnedSemaphorePermit,
    origin: Option<OwnedSemaphorePermit>,
    key: String,
    caps: Arc<UpstreamCaps>,
}

impl Drop for Places {
    fn drop(&mut self) {
        drop(self.origin.take());
        // The origin's entry goes once nobody holds or waits for its places: under the map's
        // lock, so nobody can take a new handle meanwhile.
        self.caps
            .per_origin
            .remove_if(&self.key, |_, sem| Arc::strong_count(sem) == 1);
    }
}

impl UpstreamCaps {
    pub fn from_config(cfg: &UpstreamConfig) -> UpstreamCaps {
        UpstreamCaps {
            total: Arc::new(Semaphore::new(cfg.max_connections)),
            total_max: cfg.max_connections,
            per_origin: DashMap::new(),
            per_origin_max: cfg.max_connections_per_origin,
            queue: cfg.queue_timeout,
        }
    }

    /// Upstream connections open now (their places under the total cap).
    pub fn open(&self) -> usize {
        self.total_max
            .saturating_sub(self.total.available_permits())
    }

    /// Places for one more connection to `origin` (`host:port`), waiting up to
    /// `upstream.queue_timeout`.
    pub async fn acquire(self: &Arc<Self>, origin: String) -> Result<Places, Saturated> {
        let sem = self
            .per_origin
            .entry(origin.clone())
            .or_insert_with(|| Arc::new(Semaphore::new(self.per_origin_max)))
            .clone();
        let both = async {
            let o = sem.clone().acquire_owned().await.ok()?;
            let t = self.total.clone().acquire_owned().await.ok()?;
            Some((o, t))
        };
        let got = tokio::time::timeout(self.queue, both).await;
        drop(sem);
        match got {
            Ok(Some((o, t))) => Ok(Places {
                _total: t,
                origin: Some(o),
                key: origin,
                caps: self.clone(),
            }),
            _ => {
                self.per_origin
                    .remove_if(&origin, |_, sem| Arc::strong_count(sem) == 1);
                Err(Saturated {
                    origin,
                    waited: crate::config::show(self.queue),
                    per_origin: self.per_origin_max,
                    total: self.total_max,
                })
            }
        }
    }
}

/// An upstream socket and its places under the caps; counted as an open upstream connection
/// while it lives.
pub struct Capped {
    tcp: TcpStream,
    _places: Places,
    metrics: Arc<Metrics>,
    /// When the TCP connection was up: the TLS handshake is timed from here.
    connected_at: Instant,
}

impl Capped {
    pub fn new(tcp: TcpStream, places: Places, metrics: Arc<Metrics>) -> Capped {
        metrics.upstream_total.fetch_add(1, Ordering::Relaxed);
        metrics.upstream_open.fetch_add(1, Ordering::Relaxed);
        Capped {
            tcp,
            _places: places,
            metrics,
            connected_at: Instant::now(),
        }
    }

    pub fn connected_at(&self) -> Instant {
        self.connected_at
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }
}

impl Drop for Capped {
    fn drop(&mut self) {
        self.metrics.upstream_open.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Connection for Capped {
    fn connected(&self) -> Connected {
        self.tcp.connected()
    }
}

impl AsyncRead for Capped {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_read(cx, buf)
    }
}

impl AsyncWrite for Capped {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.tcp).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.tcp).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
}

/// Raise the soft `RLIMIT_NOFILE` to the hard limit, and warn when even that cannot hold
/// `limits.max_connections` client sockets plus `upstream.max_connections` upstream ones
/// (and a few for listeners, logs and the proxy's own calls). Returns the soft limit now in
/// force, if it could be read.
#[cfg(unix)]
pub fn raise_fd_limit(max_connections: usize, upstream_max: usize) -> Option<libc::rlim_t> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass and reads nothing else.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        tracing::warn!(error = %io::Error::last_os_error(), "cannot read the open-file limit");
        return None;
    }
    if lim.rlim_cur < lim.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: setrlimit reads the struct we pass.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            tracing::debug!(
                from = lim.rlim_cur,
                to = lim.rlim_max,
                "open-file limit raised"
            );
            lim.rlim_cur = lim.rlim_max;
        } else {
            tracing::warn!(error = %io::Error::last_os_error(), "cannot raise the open-file limit");
        }
    }
    let needed = (max_connections as libc::rlim_t)
        .saturating_add(upstream_max as libc::rlim_t)
        .saturating_add(FD_SLACK);
    if lim.rlim_cur < needed {
        tracing::warn!(
            limit = lim.rlim_cur,
            needed,
            "the open-file limit cannot hold limits.max_connections plus upstream.max_connections; raise the hard limit (ulimit -Hn) or lower them"
        );
    }
    Some(lim.rlim_cur)
}

/// Elsewhere there is no such limit to raise.
#[cfg(not(unix))]
pub fn raise_fd_limit(_max_connections: usize, _upstream_max: usize) -> Option<u64> {
    None
}

/// Descriptors besides client and upstream sockets: listeners, the log, the runtime, the
/// proxy's own calls to Google.
#[cfg(unix)]
const FD_SLACK: libc::rlim_t = 64;

#[cfg(test)]
mod tests {
    use super::*;

    fn caps(per_origin: usize, total: usize) -> Arc<UpstreamCaps> {
        Arc::new(UpstreamCaps::from_config(&UpstreamConfig {
            max_connections: total,
            max_connections_per_origin: per_origin,
            queue_timeout: Duration::from_secs(10),
            ..UpstreamConfig::default()
        }))
    }

    #[tokio::test(start_paused = true)]
    async fn per_origin_and_total_caps_queue_then_fail() {
        let c = caps(2, 3);
        let a1 = c.acquire("a:443".into()).await.unwrap();
        let _a2 = c.acquire("a:443".into()).await.unwrap();
        // a is at its cap: a third waits the queue timeout, then fails.
        let t0 = tokio::time::Instant::now();
        let e = c.acquire("a:443".into()).await.err().unwrap();
        assert_eq!(t0.elapsed(), Duration::from_secs(10));
        assert!(
            e.to_string().contains("max_connections_per_origin: 2"),
            "{e}"
        );
        // b takes the last place in total; a fourth connection anywhere waits.
        let _b1 = c.acquire("b:443".into()).await.unwrap();
        let waiting = c.acquire("b:443".into());
        tokio::pin!(waiting);
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(
            tokio::time::timeout(Duration::from_secs(1), waiting.as_mut())
                .await
                .is_err(),
            "waits while both places are taken"
        );
        // A place comes free within the deadline: the waiter gets it.
        drop(a1);
        let _b2 = waiting.await.unwrap();
    }

    #[tokio::test]
    async fn an_origin_is_forgotten_when_its_last_connection_closes() {
        let c = caps(2, 3);
        let a = c.acquire("a:443".into()).await.unwrap();
        assert_eq!(c.per_origin.len(), 1);
        drop(a);
        assert_eq!(c.per_origin.len(), 0);
    }

    #[cfg(unix)]
    #[test]
    fn the_fd_limit_is_raised_to_the_hard_limit() {
        let now = raise_fd_limit(10, 10).unwrap();
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) }, 0);
        assert_eq!(lim.rlim_cur, lim.rlim_max);
        assert_eq!(now, lim.rlim_cur);
    }
}
