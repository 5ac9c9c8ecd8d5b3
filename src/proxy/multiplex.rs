//! A worker's h2 connections to its origins, one per origin, used without a pool in between.
//!
//! hyper-util's pooled client, which carried h2 requests before, served every request through
//! a pool checkout, a race between that checkout and a lazily built connect, and boxed
//! futures: about a tenth of the proxy's instructions per intercepted h2 request. An h2
//! connection carries any number of streams, so for an origin that speaks h2 there is nothing
//! to pool: [`Multiplex`] keeps one connection per origin and sends on it directly.
//!
//! The connections are the `h2` crate's (hyper's own HTTP/2 implementation), driven without
//! hyper's client around them. hyper's client passes each request through a channel to the
//! connection's dispatch task and spawns a task per request to wait for its response (2.8 KB
//! allocated and copied per request: hyper's per-connection future is in the same enum); here
//! the request's own task opens the stream ([`send`]) and awaits the response. What hyper's
//! client did per stream and is done here: a request body piped with flow control, its
//! trailers, a reset when the body fails ([`pipe`]); the response body's window given back as
//! it is read, its trailers ([`H2Body`]). Its connection-specific header stripping is
//! `headers.rs`'s. Windows are fixed, at hyper's defaults for a client without its adaptive
//! window: 2 MiB a stream, 5 MiB the connection.
//!
//! - **One connect at a time per origin.** Requests that find no live connection queue behind
//!   one connect; the rest then use what it opened, or get its error if it failed while they
//!   waited (so a black-holed origin costs the queue one connect timeout, not one each).
//! - **An origin that answers HTTP/1.1** (ALPN) gets `None`: the caller sends through the
//!   pooled client, which keeps HTTP/1.1 connections, and the shared [`Protocols`] note sends
//!   that origin's later requests there directly. The connection that found out is closed.
//! - **A connection that goes away** (GOAWAY, a reset, the origin closing it) is forgotten when
//!   its driver ends or when it refuses a new stream; a request it refused is sent once more
//!   on a new connection, as the HTTP/1.1 pool (`pool.rs`) retries a request its pooled
//!   connection never sent.
//! - **Caps.** Each connection holds its places under `upstream.max_connections` and
//!   `max_connections_per_origin` (`caps.rs`), taken by the dialer before it connects.
//! - **Idle connections close** after `upstream.idle_timeout` without a new request, as the
//!   pool's do. Streams still open on them run to their end.
//! - **Never panics on a peer's behaviour**: every h2 error becomes the request's error or the
//!   body's.
//!
//! [`Protocols`]: super::upstream::Protocols

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::uri::{Authority, Scheme};
use http::{HeaderMap, Request, Response, Uri};
use http_body::{Body, Frame, SizeHint};
use hyper_util::client::legacy::connect::Connection;
use hyper_util::rt::TokioIo;
use tokio::time::Instant;
use tower::Service;

use super::pool::hash_caseless;
use super::upload::Upload;
use super::upstream::{BoxError, Connector, Protocols, UpBody};

/// The sending half of an h2 connection to an origin.
pub type H2Send = h2::client::SendRequest<Bytes>;

/// Per-stream receive window: hyper's default for a client without its adaptive window.
const STREAM_WINDOW: u32 = 2 * 1024 * 1024;
/// Connection receive window: hyper's default likewise.
const CONNECTION_WINDOW: u32 = 5 * 1024 * 1024;
/// The largest response header block accepted from an origin: hyper's client default.
const MAX_HEADER_LIST: u32 = 16 * 1024;
/// Request body bytes h2 may queue per stream beyond what the origin's window takes.
const MAX_SEND_BUFFER: usize = 1024 * 1024;
/// Streams opened at once before the origin's SETTINGS say how many it takes (h2's own
/// default is unbounded; hyper's is 100, RFC 9113 §6.5.2's recommended minimum).
const INITIAL_MAX_STREAMS: usize = 100;

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
    send: H2Send,
    last_used: Instant,
}

type Entries = Mutex<HashMap<Origin, Entry>>;

/// An origin's authority as the key of [`Entries`]: equal as `Authority` is (without regard to
/// case), hashed with [`hash_caseless`] rather than a byte at a time.
#[derive(Clone, PartialEq, Eq)]
struct Origin(Authority);

impl std::hash::Hash for Origin {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        hash_caseless(self.0.as_str(), state);
    }
}

/// The h2 connections of one worker; see the module documentation.
pub struct Multiplex {
    entries: Arc<Entries>,
    connector: Connector,
    protocols: Arc<Protocols>,
    builder: h2::client::Builder,
    idle_timeout: Duration,
    next_id: AtomicU64,
}

impl Multiplex {
    pub fn new(connector: Connector, protocols: Arc<Protocols>, idle_timeout: Duration) -> Self {
        let mut builder = h2::client::Builder::new();
        builder
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_header_list_size(MAX_HEADER_LIST)
            .max_send_buffer_size(MAX_SEND_BUFFER)
            .initial_max_send_streams(INITIAL_MAX_STREAMS)
            .enable_push(false);
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
    pub fn live(&self, uri: &Uri) -> Option<(u64, H2Send)> {
        let authority = uri.authority()?;
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        let live = entries.get_mut(&Origin(authority.clone()))?.live.as_mut()?;
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
    ) -> Result<Result<Response<UpBody>, BoxError>, Request<Upload>> {
        let Some(authority) = req.uri().authority().cloned() else {
            return Err(req);
        };
        let (id, send_on) = match self.connect(&authority).await {
            Ok(Some(live)) => live,
            Ok(None) => return Err(req),
            Err(e) => return Ok(Err(e)),
        };
        match send(send_on, req).await {
            Ok(resp) => Ok(Ok(resp)),
            Err(e) => {
                // Refused by a connection just opened: it is of no use to anyone. (An error
                // after sending, such as a reset of this one stream, leaves it be.)
                if matches!(e, SendError::Refused(..)) {
                    forget(&self.entries, &authority, id);
                }
                Ok(Err(e.into_error()))
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
    async fn connect(&self, authority: &Authority) -> Result<Option<(u64, H2Send)>, BoxError> {
        if self
            .protocols
            .is_http1(authority.host(), authority.port_u16().unwrap_or(443))
        {
            return Ok(None);
        }
        let turn = {
            let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
            entries
                .entry(Origin(authority.clone()))
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
                if let Some(entry) = entries.get_mut(&Origin(authority.clone())) {
                    // Kept for the requests queued behind this connect; with none, dropped.
                    if Arc::strong_count(&entry.connecting) > 2 {
                        entry.failed = Some((Instant::now(), why.clone()));
                    } else if entry.live.is_none() {
                        entries.remove(&Origin(authority.clone()));
                    }
                }
                Err(Box::new(ConnectFailed(why)))
            }
            ok => ok,
        }
    }

    fn failed_since(&self, authority: &Authority, since: Instant) -> Option<Arc<BoxError>> {
        let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        let (at, why) = entries.get(&Origin(authority.clone()))?.failed.as_ref()?;
        (*at >= since).then(|| why.clone())
    }

    /// Connect, and on h2 hand-shake and record the connection; the caller holds the turn.
    async fn open(&self, authority: &Authority) -> Result<Option<(u64, H2Send)>, BoxError> {
        let uri = Uri::builder()
            .scheme(Scheme::HTTPS)
            .authority(authority.clone())
            .path_and_query("/")
            .build()?;
        let io = self.connector.clone().call(uri).await?;
        if !io.connected().is_negotiated_h2() {
            return Ok(None);
        }
        let (send, conn) = self.builder.handshake::<_, Bytes>(TokioIo::new(io)).await?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        {
            let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
            entries.entry(Origin(authority.clone())).or_default().live = Some(Live {
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

    fn live_at(&self, authority: &Authority) -> Option<(u64, H2Send)> {
        let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        let live = entries.get(&Origin(authority.clone()))?.live.as_ref()?;
        Some((live.id, live.send.clone()))
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
    if let Some(entry) = entries.get_mut(&Origin(authority.clone())) {
        if entry.live.as_ref().is_some_and(|l| l.id == id) {
            entry.live = None;
            // Nobody is connecting or queued to: the origin is forgotten altogether.
            if Arc::strong_count(&entry.connecting) == 1 {
                entries.remove(&Origin(authority.clone()));
            }
        }
    }
}

/// Drive one connection to its end. Once it has gone `idle` without a new request, its
/// `SendRequest` is dropped from the record: h2 then closes it when its open streams end.
async fn drive<C, E>(conn: C, entries: Weak<Entries>, authority: Authority, id: u64, idle: Duration)
where
    C: Future<Output = Result<(), E>>,
    E: std::fmt::Display,
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
                    guard.get(&Origin(authority.clone())).and_then(|e| e.live.as_ref()).filter(|l| l.id == id).map(|l| l.last_used)
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

/// Why a request got no response on an h2 connection.
pub enum SendError {
    /// The connection took no new stream (it received a GOAWAY, or is gone): the request comes
    /// back unsent.
    Refused(Box<Request<Upload>>, h2::Error),
    /// The stream failed, or its response did.
    Failed(h2::Error),
}

impl SendError {
    pub fn into_error(self) -> BoxError {
        match self {
            SendError::Refused(_, e) | SendError::Failed(e) => Box::new(e),
        }
    }
}

/// Open a stream for `req` on `conn` and await the response head. A request with a body has
/// it piped on a task of its own ([`pipe`]), as hyper's client did: the response may come
/// before the body is sent (an origin refusing an upload answers early).
pub async fn send(mut conn: H2Send, req: Request<Upload>) -> Result<Response<UpBody>, SendError> {
    // Ready when the connection can open a stream now (the origin's concurrency limit);
    // an error means it never will.
    if let Err(e) = std::future::poll_fn(|cx| conn.poll_ready(cx)).await {
        return Err(SendError::Refused(Box::new(req), e));
    }
    let (parts, body) = req.into_parts();
    let end = parts.method != http::Method::CONNECT && body.is_end_stream();
    let (response, stream) = conn
        .send_request(Request::from_parts(parts, ()), end)
        .map_err(SendError::Failed)?;
    drop(conn);
    if !end {
        tokio::spawn(pipe(body, stream));
    }
    let resp = response.await.map_err(SendError::Failed)?;
    let (parts, recv) = resp.into_parts();
    let body = H2Body::new(recv, &parts.headers);
    Ok(Response::from_parts(parts, UpBody::H2(body)))
}

/// Send a request body on its stream at the pace of the origin's window, then its trailers.
/// A body that fails resets the stream; an origin that resets it stops the pipe.
async fn pipe(mut body: Upload, mut stream: h2::SendStream<Bytes>) {
    if let Err(e) = std::future::poll_fn(|cx| poll_pipe(&mut body, &mut stream, cx)).await {
        tracing::debug!(error = %e, "request body not sent in full");
    }
}

fn poll_pipe(
    body: &mut Upload,
    stream: &mut h2::SendStream<Bytes>,
    cx: &mut Context<'_>,
) -> Poll<Result<(), BoxError>> {
    loop {
        // A frame is taken from the client only while the origin's window has room. One
        // byte of it is enough to ask: h2 queues the rest of a frame (at most
        // MAX_SEND_BUFFER) and sends it as the window opens.
        stream.reserve_capacity(1);
        if stream.capacity() == 0 {
            match ready!(stream.poll_capacity(cx)) {
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Poll::Ready(Err(e.into())),
                None => return Poll::Ready(Err("the stream closed".into())),
            }
        }
        if let Poll::Ready(reset) = stream.poll_reset(cx) {
            return Poll::Ready(Err(match reset {
                Ok(reason) => format!("the origin reset the stream ({reason})").into(),
                Err(e) => e.into(),
            }));
        }
        match ready!(Pin::new(&mut *body).poll_frame(cx)) {
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => {
                    let end = body.is_end_stream();
                    stream.send_data(data, end)?;
                    if end {
                        return Poll::Ready(Ok(()));
                    }
                }
                Err(frame) => {
                    if let Ok(trailers) = frame.into_trailers() {
                        stream.reserve_capacity(0);
                        stream.send_trailers(trailers)?;
                        return Poll::Ready(Ok(()));
                    }
                }
            },
            Some(Err(e)) => {
                stream.send_reset(h2::Reason::CANCEL);
                return Poll::Ready(Err(e.into()));
            }
            None => {
                stream.send_data(Bytes::new(), true)?;
                return Poll::Ready(Ok(()));
            }
        }
    }
}

/// A response body from an h2 stream: each DATA frame's share of the window is given back as
/// it is read (so the origin sends on only as fast as the client takes), then the trailers.
pub struct H2Body {
    recv: h2::RecvStream,
    /// Bytes the origin's `content-length` says are still to come, if it sent one.
    remaining: Option<u64>,
    data_done: bool,
    done: bool,
}

impl H2Body {
    /// The body of a response whose head is `headers`: its `content-length` gives the exact
    /// size the client leg sees, none if the stream has ended already.
    fn new(recv: h2::RecvStream, headers: &HeaderMap) -> H2Body {
        let remaining = if recv.is_end_stream() {
            Some(0)
        } else {
            headers
                .get(http::header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok())
        };
        H2Body {
            recv,
            remaining,
            data_done: false,
            done: false,
        }
    }
}

/// RFC 9113 §8.1: an origin may end a stream it has answered in full with RST_STREAM(NO_ERROR);
/// that ends the body, as hyper's client took it, and is not an error.
fn ends_cleanly(e: &h2::Error) -> bool {
    e.reason() == Some(h2::Reason::NO_ERROR)
}

impl Body for H2Body {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(None);
        }
        if !this.data_done {
            match ready!(this.recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    let _ = this.recv.flow_control().release_capacity(data.len());
                    if let Some(left) = &mut this.remaining {
                        *left = left.saturating_sub(data.len() as u64);
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Some(Err(e)) => {
                    this.done = true;
                    return Poll::Ready((!ends_cleanly(&e)).then_some(Err(e)));
                }
                None => this.data_done = true,
            }
        }
        let trailers = ready!(this.recv.poll_trailers(cx));
        this.done = true;
        match trailers {
            Ok(Some(t)) => Poll::Ready(Some(Ok(Frame::trailers(t)))),
            Ok(None) => Poll::Ready(None),
            Err(e) => Poll::Ready((!ends_cleanly(&e)).then_some(Err(e))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done || self.recv.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        match self.remaining {
            Some(n) => SizeHint::with_exact(n),
            None => SizeHint::default(),
        }
    }
}
