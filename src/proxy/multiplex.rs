//! A worker's h2 connections to its origins, one per origin, used without a pool in between.
//!
//! hyper-util's pooled client, which carried h2 requests before, served every request through
//! a pool checkout, a race between that checkout and a lazily built connect, and boxed
//! futures: about a tenth of the proxy's instructions per intercepted h2 request. An h2 connection carries any number of streams,
//! so for an origin that speaks h2 there is nothing to pool: [`Multiplex`] keeps one hyper
//! `SendRequest` per origin and sends on it directly. hyper still does everything per stream
//! (body piping with flow control, trailers, resets, cancellation); this module only decides
//! which connection a request rides on.
//!
//! - **One connect at a time per origin.** Requests that find no live connection queue behind
//!   one connect; the rest then use what it opened, or get its error if it failed while they
//!   waited (so a black-holed origin costs the queue one connect timeout, not one each).
//! - **An origin that answers HTTP/1.1** (ALPN) gets `None`: the caller sends through the
//!   pooled client, which keeps HTTP/1.1 connections, and the shared [`Protocols`] note sends
//!   that origin's later requests there directly. The connection that found out is closed.
//! - **A connection that goes away** (GOAWAY, a reset, the origin closing it) is forgotten when
//!   its driver ends or when a request is handed back unsent; such a request is sent once more
//!   on a new connection, as the HTTP/1.1 pool (`pool.rs`) retries a request its pooled
//!   connection never sent.
//! - **Caps.** Each connection holds its places under `upstream.max_connections` and
//!   `max_connections_per_origin` (`caps.rs`), taken by the dialer before it connects.
//! - **Idle connections close** after `upstream.idle_timeout` without a new request, as the
//!   pool's do. Streams still open on them run to their end.
//!
//! [`Protocols`]: super::upstream::Protocols

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use http::uri::{Authority, Scheme};
use http::{Request, Response, Uri};
use hyper::body::Incoming;
use hyper::client::conn::http2;
use hyper_util::client::legacy::connect::Connection;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::time::Instant;
use tower::Service;

use super::upload::Upload;
use super::upstream::{BoxError, Connector, Protocols};

/// One origin's entry: its live connection, if any, and the turn its connects take.
#[derive(Default)]
struct Entry {
    live: Option<Live>,
    connecting: Arc<tokio::sync::Mutex<()>>,
    /// When the newest failed connect ended, and why.
    failed: Option<(Instant, Arc<BoxError>)>,
}

struct Live {
    /// Tells this connection from a later one to the same origin.
    id: u64,
    send: http2::SendRequest<Upload>,
    last_used: Instant,
}

type Entries = Mutex<HashMap<Authority, Entry>>;

/// The h2 connections of one worker; see the module documentation.
pub struct Multiplex {
    entries: Arc<Entries>,
    connector: Connector,
    protocols: Arc<Protocols>,
    builder: http2::Builder<TokioExecutor>,
    idle_timeout: Duration,
    next_id: AtomicU64,
}

impl Multiplex {
    pub fn new(connector: Connector, protocols: Arc<Protocols>, idle_timeout: Duration) -> Self {
        let mut builder = http2::Builder::new(TokioExecutor::new());
        builder.timer(TokioTimer::new()).adaptive_window(true);
        Self {
            entries: Arc::default(),
            connector,
            protocols,
            builder,
            idle_timeout,
            next_id: AtomicU64::new(1),
        }
    }

    /// The live connection to the origin of `uri`, if there is one; counts as a use.
    pub fn live(&self, uri: &Uri) -> Option<(u64, http2::SendRequest<Upload>)> {
        let authority = uri.authority()?;
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        let live = entries.get_mut(authority)?.live.as_mut()?;
        if live.send.is_closed() {
            return None;
        }
        live.last_used = Instant::now();
        Some((live.id, live.send.clone()))
    }

    /// Send `req` (an absolute `https` URI) on a connection this opens, or that another
    /// request opened while this one waited its turn. `Err(req)` hands the request back
    /// untouched when the origin speaks HTTP/1.1 (or is already known to), for the pooled
    /// client to send.
    pub async fn connect_and_send(
        &self,
        req: Request<Upload>,
    ) -> Result<Result<Response<Incoming>, BoxError>, Request<Upload>> {
        let Some(authority) = req.uri().authority().cloned() else {
            return Err(req);
        };
        let (id, mut send) = match self.connect(&authority).await {
            Ok(Some(live)) => live,
            Ok(None) => return Err(req),
            Err(e) => return Ok(Err(e)),
        };
        match send.try_send_request(req).await {
            Ok(resp) => Ok(Ok(resp)),
            Err(mut e) => {
                // Not even sent on a connection just opened: it is of no use to anyone. (An
                // error after sending, such as a reset of this one stream, leaves it be.)
                if e.take_message().is_some() {
                    forget(&self.entries, &authority, id);
                }
                Ok(Err(e.into_error().into()))
            }
        }
    }

    /// Connect to the origin of `uri`, as for a request, to learn whether it speaks HTTP/1.1;
    /// a failed connect answers no.
    pub async fn speaks_http1(&self, uri: &Uri) -> bool {
        let Some(authority) = uri.authority() else {
            return false;
        };
        matches!(self.connect(authority).await, Ok(None))
    }

    /// Open the origin's connection, one connect at a time; `None` if it speaks HTTP/1.1.
    async fn connect(
        &self,
        authority: &Authority,
    ) -> Result<Option<(u64, http2::SendRequest<Upload>)>, BoxError> {
        if self
            .protocols
            .is_http1(authority.host(), authority.port_u16().unwrap_or(443))
        {
            return Ok(None);
        }
        let turn = {
            let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
            entries
                .entry(authority.clone())
                .or_default()
                .connecting
                .clone()
        };
        let waited_from = Instant::now();
        let _turn = turn.lock().await;
        // Whoever held the turn before may have connected already, or failed to.
        if let Some(live) = self.live_at(authority) {
            return Ok(Some(live));
        }
        if let Some(why) = self.failed_since(authority, waited_from) {
            return Err(Box::new(ConnectFailed(why)));
        }
        match self.open(authority).await {
            Err(e) => {
                let why = Arc::new(e);
                let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(entry) = entries.get_mut(authority) {
                    // Kept for the requests queued behind this connect; with none, dropped.
                    if Arc::strong_count(&entry.connecting) > 2 {
                        entry.failed = Some((Instant::now(), why.clone()));
                    } else if entry.live.is_none() {
                        entries.remove(authority);
                    }
                }
                Err(Box::new(ConnectFailed(why)))
            }
            ok => ok,
        }
    }

    fn failed_since(&self, authority: &Authority, since: Instant) -> Option<Arc<BoxError>> {
        let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        let (at, why) = entries.get(authority)?.failed.as_ref()?;
        (*at >= since).then(|| why.clone())
    }

    /// Connect, and on h2 hand-shake and record the connection; the caller holds the turn.
    async fn open(
        &self,
        authority: &Authority,
    ) -> Result<Option<(u64, http2::SendRequest<Upload>)>, BoxError> {
        let uri = Uri::builder()
            .scheme(Scheme::HTTPS)
            .authority(authority.clone())
            .path_and_query("/")
            .build()?;
        let io = self.connector.clone().call(uri).await?;
        if !io.connected().is_negotiated_h2() {
            return Ok(None);
        }
        let (send, conn) = self.builder.handshake(io).await?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        {
            let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
            entries.entry(authority.clone()).or_default().live = Some(Live {
                id,
                send: send.clone(),
                last_used: Instant::now(),
            });
        }
        tokio::spawn(drive(
            conn,
            Arc::downgrade(&self.entries),
            authority.clone(),
            id,
            self.idle_timeout,
        ));
        Ok(Some((id, send)))
    }

    fn live_at(&self, authority: &Authority) -> Option<(u64, http2::SendRequest<Upload>)> {
        let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        let live = entries.get(authority)?.live.as_ref()?;
        (!live.send.is_closed()).then(|| (live.id, live.send.clone()))
    }

    /// Drop connection `id` to the origin of `uri`, if it is still the one on record.
    pub fn forget(&self, uri: &Uri, id: u64) {
        if let Some(authority) = uri.authority() {
            forget(&self.entries, authority, id);
        }
    }
}

/// A failed connect, shared by the request that made it and those queued behind it; its
/// cause stays reachable through `source()`, so a refusal by the address policy or the caps
/// answers every one of them the same way.
#[derive(Debug)]
struct ConnectFailed(Arc<BoxError>);

impl std::fmt::Display for ConnectFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("cannot connect")
    }
}

impl std::error::Error for ConnectFailed {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&**self.0)
    }
}

fn forget(entries: &Entries, authority: &Authority, id: u64) {
    let mut entries = entries.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(entry) = entries.get_mut(authority) {
        if entry.live.as_ref().is_some_and(|l| l.id == id) {
            entry.live = None;
            // Nobody is connecting or queued to: the origin is forgotten altogether.
            if Arc::strong_count(&entry.connecting) == 1 {
                entries.remove(authority);
            }
        }
    }
}

/// Drive one connection to its end. Once it has gone `idle` without a new request, its
/// `SendRequest` is dropped from the record: hyper then closes it when its open streams end.
async fn drive<C>(conn: C, entries: Weak<Entries>, authority: Authority, id: u64, idle: Duration)
where
    C: std::future::Future<Output = hyper::Result<()>>,
{
    tokio::pin!(conn);
    let mut deadline = Instant::now() + idle;
    let ended = loop {
        tokio::select! {
            r = conn.as_mut() => break r,
            _ = tokio::time::sleep_until(deadline) => {
                let Some(entries) = entries.upgrade() else { break conn.await };
                let last_used = {
                    let guard = entries.lock().unwrap_or_else(|p| p.into_inner());
                    guard.get(&authority).and_then(|e| e.live.as_ref()).filter(|l| l.id == id).map(|l| l.last_used)
                };
                match last_used {
                    Some(t) if t + idle > Instant::now() => deadline = t + idle,
                    _ => {
                        tracing::debug!(%authority, "closing an idle h2 connection");
                        forget(&entries, &authority, id);
                        break conn.await;
                    }
                }
            }
        }
    };
    if let Err(e) = ended {
        tracing::debug!(%authority, error = %e, "h2 connection ended");
    }
    if let Some(entries) = entries.upgrade() {
        forget(&entries, &authority, id);
    }
}
