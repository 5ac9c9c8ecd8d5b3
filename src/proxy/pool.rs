//! A worker's HTTP/1.1 upstream connections (origins that answered HTTP/1.1, and plain
//! `http`), kept between requests.
//!
//! hyper-util's pool, used before, raced every checkout that found no idle connection against
//! a connect of its own, and kept the connection when the connect lost: a request that arrived
//! while the connection it would have reused was still on its way back opened one more. At
//! the start of a load of 64 clients that took 175 upstream connections for 64 requests in
//! flight, each holding its TLS state until the idle timeout (hyper issue 4134: the
//! maintainers keep the race). Here, requests that find no idle connection wait in line, and a
//! connect starts only while fewer connects are under way than requests wait: whichever comes
//! first, a connection coming back or one just opened, goes to the request that has waited
//! longest, and a connection nobody waits for any more is kept idle.
//!
//! What hyper-util did that stays: `Host` from the URI, the origin-form target, a request
//! sent again (once per stale connection) when a reused connection turns out to be closed
//! before it took the request, upgrades (a 101 takes the connection out of the pool), at most
//! 256 idle connections per origin, and closing those idle for `upstream.idle_timeout`.

use std::collections::{HashMap, VecDeque};
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use http::header::{HeaderValue, HOST};
use http::uri::{Authority, Scheme};
use http::{Request, Response, Uri};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::client::legacy::connect::Connection;
use tokio::sync::oneshot;
use tower::Service;

use super::upload::Upload;
use super::upstream::{BoxError, Connector};

/// Idle connections kept per origin; one coming back past it is closed.
const MAX_IDLE: usize = 256;

/// An origin: scheme and authority. Equal as `Authority` is (without regard to case), hashed
/// with [`hash_caseless`].
#[derive(Clone, PartialEq, Eq)]
struct Key(Scheme, Authority);

impl Hash for Key {
    fn hash<H: Hasher>(&self, state: &mut H) {
        hash_caseless(self.1.as_str(), state);
        (self.0 == Scheme::HTTPS).hash(state);
    }
}

/// Hash `text` as its lowercase bytes, a piece at a time: what `Authority` (which compares
/// without regard to case) hashes, in a few writes instead of one per byte. Under the maps'
/// SipHash those byte writes cost more than the rest of a lookup, and the pool (twice) and
/// the h2 connections look an origin up with every request.
pub(crate) fn hash_caseless<H: Hasher>(text: &str, state: &mut H) {
    let mut lower = [0u8; 64];
    for piece in text.as_bytes().chunks(lower.len()) {
        let lower = &mut lower[..piece.len()];
        lower.copy_from_slice(piece);
        lower.make_ascii_lowercase();
        state.write(lower);
    }
    state.write_usize(text.len());
}

type Sender = http1::SendRequest<Upload>;

/// What a request waiting in line gets: a connection (and whether it served before), a
/// connect's failure, or word that the origin now speaks h2.
type Delivery = Result<(Sender, bool), Refused>;

/// Why a connection did not come.
pub(crate) enum Refused {
    Failed(BoxError),
    /// The new connection negotiated h2: the origin changed protocol, and the request belongs
    /// to the h2 path now (the connection is dropped; the h2 path opens its own).
    SpeaksH2,
}

/// A request's outcome on the pool; `SpeaksH2` gives the request back, unsent.
pub(crate) enum Sent {
    Answer(Result<Response<Incoming>, BoxError>),
    SpeaksH2(Request<Upload>),
}

#[derive(Default)]
struct Origin {
    /// Ready connections, the most recently used last (taken first, so that the others age
    /// out when the load falls).
    idle: Vec<(Sender, Instant)>,
    /// Requests waiting for a connection, the longest waiting first.
    waiting: VecDeque<oneshot::Sender<Delivery>>,
    /// Connects under way.
    connecting: usize,
}

#[derive(Default)]
struct Origins {
    map: HashMap<Key, Origin>,
    reaper: bool,
}

/// A worker's pool: its connections are driven by tasks on the worker's runtime.
pub(crate) struct Pool {
    origins: Arc<Mutex<Origins>>,
    connector: Connector,
    idle_timeout: Duration,
}

impl Pool {
    pub fn new(connector: Connector, idle_timeout: Duration) -> Pool {
        Pool {
            origins: Arc::default(),
            connector,
            idle_timeout,
        }
    }

    /// Send `req` (absolute URI) on one of the origin's connections.
    pub async fn request(self: Arc<Self>, mut req: Request<Upload>) -> Sent {
        let Some(key) = key_of(req.uri()) else {
            return Sent::Answer(Err(format!("no origin in {}", req.uri()).into()));
        };
        set_host(&mut req);
        let uri = req.uri().clone();
        *req.uri_mut() = origin_form(&uri);
        loop {
            let (mut send, reused) = match self.checkout(&key).await {
                Ok(c) => c,
                Err(Refused::Failed(e)) => return Sent::Answer(Err(e)),
                Err(Refused::SpeaksH2) => {
                    // As it came: absolute URI, and no `Host` (the h2 leg carries `:authority`
                    // only; `headers::check_authority` took the client's out).
                    *req.uri_mut() = uri;
                    req.headers_mut().remove(HOST);
                    return Sent::SpeaksH2(req);
                }
            };
            match send.try_send_request(req).await {
                Ok(resp) => {
                    // Back in the pool once it can take the next request: after this answer's
                    // body has been read, or never if it closes (or became an upgrade).
                    if send.is_ready() {
                        give(&self.origins, &key, send, self.idle_timeout);
                    } else {
                        let (origins, key, idle) = (
                            Arc::downgrade(&self.origins),
                            key.clone(),
                            self.idle_timeout,
                        );
                        tokio::spawn(async move {
                            if send.ready().await.is_ok() {
                                if let Some(origins) = origins.upgrade() {
                                    give(&origins, &key, send, idle);
                                }
                            }
                        });
                    }
                    return Sent::Answer(Ok(resp));
                }
                Err(mut e) => match e.take_message() {
                    // Never sent: the reused connection closed meanwhile. Again, on another.
                    Some(back) if reused => {
                        tracing::debug!(error = %e.into_error(), "pooled connection gone; sending on another");
                        req = back;
                    }
                    _ => return Sent::Answer(Err(e.into_error().into())),
                },
            }
        }
    }

    /// An idle connection, or a place in line; a connect starts if fewer are under way than
    /// requests wait.
    async fn checkout(&self, key: &Key) -> Delivery {
        let line = {
            let mut origins = lock(&self.origins);
            let origin = origins.map.entry(key.clone()).or_default();
            let now = Instant::now();
            while let Some((send, since)) = origin.idle.pop() {
                if send.is_ready() && now.saturating_duration_since(since) < self.idle_timeout {
                    return Ok((send, true));
                }
            }
            origin.waiting.retain(|w| !w.is_closed());
            let (tx, rx) = oneshot::channel();
            origin.waiting.push_back(tx);
            if origin.connecting < origin.waiting.len() {
                origin.connecting += 1;
                self.spawn_connect(key.clone());
            }
            rx
        };
        line.await
            .unwrap_or_else(|_| Err(Refused::Failed("the worker's pool stopped".into())))
    }

    /// Open a connection on a task of its own, for whoever waits longest when it is up.
    fn spawn_connect(&self, key: Key) {
        let origins = Arc::downgrade(&self.origins);
        let connector = self.connector.clone();
        let idle = self.idle_timeout;
        tokio::spawn(async move {
            let made = connect(connector, &key).await;
            let Some(origins) = origins.upgrade() else {
                return;
            };
            // A failure goes to the longest waiting request: it has waited at least as long
            // as this connect took (one queued at the caps fails after
            // `upstream.queue_timeout`, as before).
            hand_out(&origins, &key, made.map(|send| (send, false)), true, idle);
        });
    }
}

/// A connection ready for the next request (or a connect's failure): to the longest waiting
/// request; a connection nobody waits for is kept idle.
fn give(origins: &Arc<Mutex<Origins>>, key: &Key, send: Sender, idle_timeout: Duration) {
    hand_out(origins, key, Ok((send, true)), false, idle_timeout);
}

/// `connected`: the delivery ends one of the origin's connects.
fn hand_out(
    origins: &Arc<Mutex<Origins>>,
    key: &Key,
    mut delivery: Delivery,
    connected: bool,
    idle_timeout: Duration,
) {
    let mut guard = lock(origins);
    let start_reaper = !guard.reaper;
    let origin = guard.map.entry(key.clone()).or_default();
    if connected {
        origin.connecting = origin.connecting.saturating_sub(1);
    }
    while let Some(w) = origin.waiting.pop_front() {
        match w.send(delivery) {
            Ok(()) => return,
            Err(back) => delivery = back,
        }
    }
    let Ok((send, _)) = delivery else {
        return;
    };
    if origin.idle.len() < MAX_IDLE && !send.is_closed() {
        origin.idle.push((send, Instant::now()));
        if start_reaper {
            guard.reaper = true;
            spawn_reaper(Arc::downgrade(origins), idle_timeout);
        }
    }
}

/// Close connections idle for `idle_timeout`, looking every quarter of it (at least every
/// 100 ms, at most every 30 s), and forget origins with nothing left; stops with the pool.
fn spawn_reaper(origins: Weak<Mutex<Origins>>, idle_timeout: Duration) {
    let every = (idle_timeout / 4).clamp(Duration::from_millis(100), Duration::from_secs(30));
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(every).await;
            let Some(origins) = origins.upgrade() else {
                return;
            };
            let now = Instant::now();
            lock(&origins).map.retain(|_, o| {
                o.idle.retain(|(send, since)| {
                    !send.is_closed() && now.saturating_duration_since(*since) < idle_timeout
                });
                !(o.idle.is_empty() && o.waiting.is_empty() && o.connecting == 0)
            });
        }
    });
}

fn lock(origins: &Mutex<Origins>) -> MutexGuard<'_, Origins> {
    origins.lock().unwrap_or_else(|p| p.into_inner())
}

/// Connect, TLS and the HTTP/1.1 handshake; the connection is driven by a task of its own.
async fn connect(mut connector: Connector, key: &Key) -> Result<Sender, Refused> {
    let uri = Uri::builder()
        .scheme(key.0.clone())
        .authority(key.1.clone())
        .path_and_query("/")
        .build()
        .map_err(|e| Refused::Failed(e.into()))?;
    let io = connector.call(uri).await.map_err(Refused::Failed)?;
    if io.connected().is_negotiated_h2() {
        return Err(Refused::SpeaksH2);
    }
    let (send, conn) = http1::Builder::new()
        .handshake(io)
        .await
        .map_err(|e| Refused::Failed(e.into()))?;
    tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!(error = %e, "upstream HTTP/1.1 connection ended with an error");
        }
    });
    // Ready once its task has run: a request sent before would be refused.
    let mut send = send;
    send.ready().await.map_err(|e| Refused::Failed(e.into()))?;
    Ok(send)
}

/// The pool's key for an absolute URI: scheme and authority.
fn key_of(uri: &Uri) -> Option<Key> {
    Some(Key(uri.scheme()?.clone(), uri.authority()?.clone()))
}

/// `Host` from the URI, the port only if it is not the scheme's default, unless the request
/// has one.
fn set_host(req: &mut Request<Upload>) {
    let uri = req.uri();
    let Some(host) = uri.host() else {
        return;
    };
    let default = if uri.scheme() == Some(&Scheme::HTTP) {
        80
    } else {
        443
    };
    let value = match uri.port_u16() {
        Some(p) if p != default => HeaderValue::from_str(&format!("{host}:{p}")),
        _ => HeaderValue::from_str(host),
    };
    if let Ok(v) = value {
        req.headers_mut().entry(HOST).or_insert(v);
    }
}

/// The request target an HTTP/1.1 origin gets: path and query, `/` if empty.
fn origin_form(uri: &Uri) -> Uri {
    match uri.path_and_query() {
        Some(pq) => Uri::from(pq.clone()),
        None => Uri::from_static("/"),
    }
}

#[cfg(test)]
mod tests {
    use std::hash::BuildHasher;

    use super::*;

    #[test]
    fn an_origin_is_one_key_whatever_the_case() {
        let hasher = std::collections::hash_map::RandomState::new();
        let upper = key_of(&Uri::from_static("https://Storage.GoogleAPIs.com:8443/x")).unwrap();
        let lower = key_of(&Uri::from_static("https://storage.googleapis.com:8443/y")).unwrap();
        assert!(upper == lower);
        assert_eq!(hasher.hash_one(&upper), hasher.hash_one(&lower));
        // Longer than one piece of the hash.
        let long = format!("https://{}.example/", "A".repeat(100));
        let long_lower = long.to_ascii_lowercase();
        let long = key_of(&long.parse().unwrap()).unwrap();
        let long_lower = key_of(&long_lower.parse().unwrap()).unwrap();
        assert!(long == long_lower);
        assert_eq!(hasher.hash_one(&long), hasher.hash_one(&long_lower));
        assert!(hasher.hash_one(&long) != hasher.hash_one(&lower));
        let plain = key_of(&Uri::from_static("http://storage.googleapis.com:8443/")).unwrap();
        assert!(plain != lower);
        assert!(hasher.hash_one(&plain) != hasher.hash_one(&lower));
        assert!(key_of(&Uri::from_static("/relative")).is_none());
    }
}
