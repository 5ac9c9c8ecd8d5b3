//! Gateway mode: who is sending a request, and which routes they may use.
//!
//! A client is named in the config by `Proxy-Authorization: Basic` credentials (the user name
//! is the client's name; the config holds an Argon2 PHC hash of the password, never the
//! password), by source CIDRs, or by both. A route's `clients:` list says who may use it (no
//! list: every client).
//!
//! - **Once per connection.** [`admit`] runs on the client-facing connection, before CONNECT
//!   or an absolute-form request is looked at: it names the [`ClientRef`] (or answers 407), and
//!   the intercepted session (or tunnel) inherits it. A password is checked once per
//!   credential and config generation (Argon2 on the blocking pool, so a worker thread never
//!   stalls on it); later connections with the same header hit a keyed digest cache.
//! - **Per request: a bit test.** The compiled client holds its allowed routes as a bitset for
//!   the route table of the same generation; [`select`] walks the route table once, skipping
//!   routes the client may not use. No allocation, no lock. After a reload, a connection finds
//!   its client again by name in the new generation (a hash lookup), and is refused if the
//!   client is gone or its credentials changed.
//! - `Proxy-Authorization` is removed here, so it never goes upstream, and it never appears
//!   in a log line or an error body.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use argon2::{PasswordHash, PasswordVerifier};
use base64::Engine as _;
use dashmap::DashMap;
use http::{header, HeaderValue, Method, Request};
use serde::Deserialize;

use crate::config::Config;
use crate::proxy::{Body, Live, ProxyError, ProxyState};
use crate::routes::RouteSet;

/// One client in the config.
#[derive(Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClientConfig {
    /// An Argon2 hash in PHC form (`$argon2id$v=19$m=…,t=…,p=…$salt$hash`) of the password
    /// sent with `Proxy-Authorization: Basic` (user name: the client's name).
    pub password_hash: Option<String>,
    /// Source addresses (`10.0.0.0/8`, `2001:db8::/32`, or one address). With a password as
    /// well, both must hold.
    pub cidrs: Vec<String>,
}

/// Never prints the hash.
impl std::fmt::Debug for ClientConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientConfig")
            .field(
                "password_hash",
                &self.password_hash.as_ref().map(|_| "<hidden>"),
            )
            .field("cidrs", &self.cidrs)
            .finish()
    }
}

/// The config rules for `clients`, `routes[].clients` and `serve_anyone`: `(key, rule)` of the
/// first one broken. Messages never echo a value.
pub fn validate(config: &Config) -> Result<(), (String, String)> {
    for (name, c) in &config.clients {
        let key = |k: &str| format!("clients.{name}.{k}");
        if name.is_empty() || name.contains(':') {
            return Err((
                format!("clients.{name}"),
                "a client name is a Basic user name: not empty, no `:`".into(),
            ));
        }
        if c.password_hash.is_none() && c.cidrs.is_empty() {
            return Err((
                format!("clients.{name}"),
                "a client needs `password_hash`, `cidrs`, or both".into(),
            ));
        }
        if let Some(h) = &c.password_hash {
            let ok = PasswordHash::new(h).is_ok_and(|p| p.algorithm.as_str().starts_with("argon2"));
            if !ok {
                return Err((
                    key("password_hash"),
                    "not an Argon2 hash in PHC form ($argon2id$v=19$m=…$salt$hash)".into(),
                ));
            }
        }
        for (i, c) in c.cidrs.iter().enumerate() {
            if Cidr::parse(c).is_none() {
                return Err((
                    format!("clients.{name}.cidrs[{i}]"),
                    "not an address or address/prefix".into(),
                ));
            }
        }
    }
    for (i, r) in config.routes.iter().enumerate() {
        for (j, c) in r.clients.iter().enumerate() {
            if !config.clients.contains_key(c) {
                return Err((
                    format!("routes[{i}].clients[{j}]"),
                    "names no client under `clients`".into(),
                ));
            }
        }
    }
    if config.clients.is_empty() && !config.serve_anyone && !config.listen.ip().is_loopback() {
        return Err((
            "listen".into(),
            "not a loopback address and no `clients` are configured: anyone who can reach the \
             proxy would get every route's identity. Configure `clients`, or set \
             `serve_anyone: true` to serve everyone who can reach it"
                .into(),
        ));
    }
    Ok(())
}

pub use crate::proxy::destination::Cidr;

/// A compiled client of one config generation.
struct Client {
    name: Arc<str>,
    password_hash: Option<String>,
    cidrs: Vec<Cidr>,
    /// The routes of the same generation this client may use.
    allowed: RouteSet,
    /// Changes when the client's credentials or addresses change: an open connection of the
    /// client is refused after a reload that changed them.
    fingerprint: u64,
}

/// The clients of one config generation.
pub struct ClientTable {
    /// Empty: no clients configured, everyone is the anonymous client.
    clients: Vec<Client>,
    by_name: HashMap<Arc<str>, usize>,
    all: RouteSet,
    /// Credentials already verified in this generation: a keyed digest of the header value →
    /// client index. Bounded; dropped with the generation.
    verified: DashMap<[u8; 32], usize>,
    /// A random key for those digests, so the cache holds nothing a password can be checked
    /// against outside this process.
    key: [u8; 32],
}

/// The most verified credentials kept per generation; when full the cache starts over.
const MAX_VERIFIED: usize = 4096;

impl ClientTable {
    /// Compile `config.clients` against the route table of the same config.
    pub fn compile(config: &Config, routes: usize) -> ClientTable {
        let mut clients = Vec::with_capacity(config.clients.len());
        let mut by_name = HashMap::with_capacity(config.clients.len());
        for (name, c) in &config.clients {
            let mut allowed = RouteSet::none(routes);
            for (i, r) in config.routes.iter().enumerate() {
                if r.clients.is_empty() || r.clients.iter().any(|n| n == name) {
                    allowed.insert(i);
                }
            }
            let name: Arc<str> = Arc::from(name.as_str());
            by_name.insert(name.clone(), clients.len());
            clients.push(Client {
                name,
                password_hash: c.password_hash.clone(),
                cidrs: c.cidrs.iter().filter_map(|s| Cidr::parse(s)).collect(),
                allowed,
                fingerprint: fingerprint(c),
            });
        }
        ClientTable {
            clients,
            by_name,
            all: RouteSet::All,
            verified: DashMap::new(),
            key: rand::random(),
        }
    }

    /// No clients configured: everyone is the anonymous client.
    pub fn is_open(&self) -> bool {
        self.clients.is_empty()
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.clients.iter().map(|c| &*c.name)
    }

    /// The routes a named client may use (for `check --client`).
    pub fn allowed_for(&self, name: &str) -> Option<&RouteSet> {
        self.by_name
            .get(name)
            .and_then(|&i| self.clients.get(i))
            .map(|c| &c.allowed)
    }

    fn digest(&self, value: &[u8]) -> [u8; 32] {
        use sha2::Digest;
        let mut h = sha2::Sha256::new();
        h.update(self.key);
        h.update(value);
        h.finalize().into()
    }

    /// Who is this? `header` is the `Proxy-Authorization` value, if any.
    pub async fn identify(
        &self,
        generation: u64,
        peer: IpAddr,
        header: Option<&HeaderValue>,
    ) -> Result<ClientRef, AuthError> {
        if self.is_open() {
            return Ok(ClientRef::anyone(generation));
        }
        let Some(value) = header else {
            // No credentials: a client named by its addresses alone.
            return self
                .clients
                .iter()
                .position(|c| c.password_hash.is_none() && c.cidrs.iter().any(|n| n.contains(peer)))
                .map(|i| self.client_ref(generation, i))
                .ok_or(AuthError::Missing);
        };
        let digest = self.digest(value.as_bytes());
        if let Some(i) = self.verified.get(&digest).map(|e| *e.value()) {
            return self.check_address(generation, i, peer);
        }
        let (user, password) = basic(value).ok_or(AuthError::Malformed)?;
        let index = *self.by_name.get(user.as_str()).ok_or(AuthError::Invalid)?;
        let hash = self
            .clients
            .get(index)
            .and_then(|c| c.password_hash.clone())
            .ok_or(AuthError::Invalid)?;
        // Argon2 takes tens of milliseconds by design: off the worker thread.
        let ok = tokio::task::spawn_blocking(move || {
            PasswordHash::new(&hash).is_ok_and(|h| {
                argon2::Argon2::default()
                    .verify_password(password.as_bytes(), &h)
                    .is_ok()
            })
        })
        .await
        .unwrap_or(false);
        if !ok {
            return Err(AuthError::Invalid);
        }
        if self.verified.len() >= MAX_VERIFIED {
            self.verified.clear();
        }
        self.verified.insert(digest, index);
        self.check_address(generation, index, peer)
    }

    fn check_address(
        &self,
        generation: u64,
        i: usize,
        peer: IpAddr,
    ) -> Result<ClientRef, AuthError> {
        let c = self.clients.get(i).ok_or(AuthError::Invalid)?;
        if c.cidrs.is_empty() || c.cidrs.iter().any(|n| n.contains(peer)) {
            Ok(self.client_ref(generation, i))
        } else {
            Err(AuthError::Invalid)
        }
    }

    fn client_ref(&self, generation: u64, index: usize) -> ClientRef {
        match self.clients.get(index) {
            Some(c) => ClientRef {
                generation,
                index,
                name: Some(c.name.clone()),
                fingerprint: c.fingerprint,
            },
            None => ClientRef::anyone(generation),
        }
    }
}

/// A stable digest of a client's credentials and addresses (not secret: it only tells one
/// generation's client from the next).
fn fingerprint(c: &ClientConfig) -> u64 {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    h.update(c.password_hash.as_deref().unwrap_or("").as_bytes());
    for n in &c.cidrs {
        h.update(b"\0");
        h.update(n.as_bytes());
    }
    let d = h.finalize();
    let mut b = [0u8; 8];
    b.copy_from_slice(&d[..8]);
    u64::from_le_bytes(b)
}

/// An Argon2id hash (the crate's default parameters) of `password`, in PHC form, with a
/// random salt: what `clients.NAME.password_hash` holds.
pub fn hash(password: &str) -> Result<String, String> {
    use argon2::password_hash::{PasswordHasher, SaltString};
    let salt = SaltString::encode_b64(&rand::random::<[u8; 16]>())
        .map_err(|e| format!("cannot make a salt: {e}"))?;
    argon2::Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| format!("cannot hash: {e}"))
}

/// `Basic base64(user:password)` → (user, password).
fn basic(value: &HeaderValue) -> Option<(String, String)> {
    let v = value.to_str().ok()?;
    let (scheme, rest) = v.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let raw = base64::engine::general_purpose::STANDARD
        .decode(rest.trim())
        .ok()?;
    let text = String::from_utf8(raw).ok()?;
    let (user, password) = text.split_once(':')?;
    Some((user.to_string(), password.to_string()))
}

/// Why a client was not admitted; the message never includes what the client sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("proxy authentication required: send Proxy-Authorization: Basic with a configured client's name and password")]
    Missing,
    #[error("proxy authentication failed: only Basic credentials are accepted")]
    Malformed,
    #[error("proxy authentication failed: unknown client, wrong password, or not allowed from this address")]
    Invalid,
}

/// The client of a connection, as resolved when it was admitted.
#[derive(Debug, Clone)]
pub struct ClientRef {
    /// The config generation `index` belongs to.
    generation: u64,
    index: usize,
    /// `None`: no clients were configured (everyone is served).
    name: Option<Arc<str>>,
    fingerprint: u64,
}

impl ClientRef {
    pub fn anyone(generation: u64) -> ClientRef {
        ClientRef {
            generation,
            index: 0,
            name: None,
            fingerprint: 0,
        }
    }

    /// For access lines: the client's name, or `-` when no clients are configured.
    pub fn name(&self) -> &str {
        self.name.as_deref().unwrap_or("-")
    }

    /// The routes this client may use in `live`'s generation: a vector index when the
    /// generation is the one the client was admitted in, a lookup by name after a reload.
    pub fn allowed<'a>(&self, live: &'a Live) -> Result<&'a RouteSet, ProxyError> {
        self.resolve(live).map(|(_, allowed)| allowed)
    }

    /// [`ClientRef::allowed`], and the client's index in `live`'s table (`None` when no
    /// clients are configured): where its metrics series are.
    fn resolve<'a>(&self, live: &'a Live) -> Result<(Option<usize>, &'a RouteSet), ProxyError> {
        let table = &live.clients;
        let Some(name) = &self.name else {
            if table.is_open() {
                return Ok((None, &table.all));
            }
            return Err(ProxyError::ClientGone(
                "clients are configured now (a reload): open a new connection with proxy credentials".into(),
            ));
        };
        let index = if self.generation == live.generation {
            Some(self.index).filter(|&i| i < table.clients.len())
        } else {
            table.by_name.get(name).copied().filter(|&i| {
                table
                    .clients
                    .get(i)
                    .is_some_and(|c| c.fingerprint == self.fingerprint)
            })
        };
        match index.and_then(|i| Some((i, table.clients.get(i)?))) {
            Some((i, c)) => Ok((Some(i), &c.allowed)),
            None if table.is_open() => Ok((None, &table.all)),
            None => Err(ProxyError::ClientGone(format!(
                "client `{name}` was removed or its credentials changed (a reload): open a new connection"
            ))),
        }
    }
}

/// The route for a request from `client`: the first route matching host, path and method
/// among those the client may use. A matching route the client may not use is a 403 naming
/// both; no match at all is `None` (the `unmatched` policy decides). Beside it, the client's
/// index in `live` (`None`: no clients configured, or the client is gone), for its metrics.
pub fn select(
    live: &Live,
    client: &ClientRef,
    host: &str,
    path: &str,
    method: &Method,
) -> (Option<usize>, Result<Option<usize>, ProxyError>) {
    let (index, allowed) = match client.resolve(live) {
        Ok(r) => r,
        Err(e) => return (None, Err(e)),
    };
    (index, find_route(live, client, allowed, host, path, method))
}

fn find_route(
    live: &Live,
    client: &ClientRef,
    allowed: &RouteSet,
    host: &str,
    path: &str,
    method: &Method,
) -> Result<Option<usize>, ProxyError> {
    if let Some(i) = live.routes.find_in(host, path, method, allowed) {
        return Ok(Some(i));
    }
    if matches!(allowed, RouteSet::All) {
        return Ok(None);
    }
    match live.routes.find(host, path, method) {
        Some(i) => Err(ProxyError::NotForClient {
            client: client.name().to_string(),
            route: live
                .routes
                .get(i)
                .map_or_else(String::new, |r| r.name.clone()),
        }),
        None => Ok(None),
    }
}

/// The gate in front of the client-facing service: identify the client of a CONNECT or an
/// absolute-form request (or answer 407 with `Proxy-Authenticate`), and remove
/// `Proxy-Authorization` so it goes no further.
pub async fn admit<B>(
    req: &mut Request<B>,
    peer: SocketAddr,
    state: &ProxyState,
) -> Result<ClientRef, http::Response<Body>> {
    let header = req.headers_mut().remove(header::PROXY_AUTHORIZATION);
    let live = state.live.load_full();
    match live
        .clients
        .identify(live.generation, peer.ip(), header.as_ref())
        .await
    {
        Ok(c) => Ok(c),
        Err(e) => {
            let m = &state.metrics;
            m.auth_failures_total.fetch_add(1, Ordering::Relaxed);
            m.refused(407);
            let target = req.uri().authority().map_or("-", |a| a.as_str());
            tracing::info!(
                target: "impersonate_proxy::access",
                client = %peer, client_name = "-", target, route = "-", status = 407u16,
                reason = %e, "refused"
            );
            Err(crate::proxy::to_response(&ProxyError::ProxyAuth(e)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidrs_match_v4_v6_and_mapped_addresses() {
        let n = Cidr::parse("10.1.0.0/16").unwrap();
        assert!(n.contains("10.1.2.3".parse().unwrap()));
        assert!(n.contains("::ffff:10.1.2.3".parse().unwrap()));
        assert!(!n.contains("10.2.0.1".parse().unwrap()));
        let one = Cidr::parse("127.0.0.1").unwrap();
        assert!(one.contains("127.0.0.1".parse().unwrap()));
        assert!(!one.contains("127.0.0.2".parse().unwrap()));
        assert!(Cidr::parse("0.0.0.0/0")
            .unwrap()
            .contains("8.8.8.8".parse().unwrap()));
        assert!(Cidr::parse("2001:db8::/32")
            .unwrap()
            .contains("2001:db8::1".parse().unwrap()));
        assert!(Cidr::parse("10.0.0.0/33").is_none());
        assert!(Cidr::parse("nonsense").is_none());
    }

    #[test]
    fn client_rules_name_the_key_and_never_echo_a_value() {
        for (yaml, key) in [
            ("clients:\n  a: {}\n", "clients.a"),
            (
                "clients:\n  a: { cidrs: [SECRET-10.0.0.0/99] }\n",
                "clients.a.cidrs[0]",
            ),
            (
                "clients:\n  a: { password_hash: SECRET-plain }\n",
                "clients.a.password_hash",
            ),
            (
                "clients:\n  a: { cidrs: [10.0.0.0/8] }\nroutes:\n  - { host: a.googleapis.com, passthrough: true, clients: [b] }\n",
                "routes[0].clients[0]",
            ),
            (
                "routes:\n  - { host: a.googleapis.com, passthrough: true, clients: [a] }\n",
                "routes[0].clients[0]",
            ),
        ] {
            let err = Config::from_yaml(yaml, "c.yaml").unwrap_err().to_string();
            assert!(err.contains(key) && !err.contains("SECRET"), "{yaml}: {err}");
        }
    }

    #[tokio::test]
    async fn identify_by_password_address_or_both() {
        let h = hash("pw").unwrap();
        let y = format!(
            "clients:\n  a: {{ password_hash: '{h}' }}\n  b: {{ cidrs: [10.0.0.0/8] }}\n  c: {{ password_hash: '{h}', cidrs: [192.168.0.0/16] }}\n"
        );
        let config = Config::from_yaml(&y, "c.yaml").unwrap();
        let t = ClientTable::compile(&config, 0);
        let basic = |user: &str, pw: &str| {
            let b = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pw}"));
            HeaderValue::from_str(&format!("Basic {b}")).unwrap()
        };
        let lo: IpAddr = "127.0.0.1".parse().unwrap();
        let ten: IpAddr = "10.1.2.3".parse().unwrap();
        let lan: IpAddr = "192.168.1.1".parse().unwrap();
        let name = |r: Result<ClientRef, AuthError>| r.map(|c| c.name().to_string());
        let a = basic("a", "pw");
        assert_eq!(name(t.identify(1, lo, Some(&a)).await), Ok("a".into()));
        // Again: from the digest cache.
        assert_eq!(name(t.identify(1, lo, Some(&a)).await), Ok("a".into()));
        let wrong = basic("a", "no");
        assert_eq!(
            name(t.identify(1, lo, Some(&wrong)).await),
            Err(AuthError::Invalid)
        );
        assert_eq!(name(t.identify(1, ten, None).await), Ok("b".into()));
        assert_eq!(name(t.identify(1, lo, None).await), Err(AuthError::Missing));
        let c = basic("c", "pw");
        assert_eq!(name(t.identify(1, lan, Some(&c)).await), Ok("c".into()));
        // c's password from outside c's network, even once cached.
        assert_eq!(
            name(t.identify(1, lo, Some(&c)).await),
            Err(AuthError::Invalid)
        );
        let bearer = HeaderValue::from_static("Bearer x");
        assert_eq!(
            name(t.identify(1, lo, Some(&bearer)).await),
            Err(AuthError::Malformed)
        );
    }

    #[test]
    fn basic_credentials_parse() {
        let v = HeaderValue::from_static("Basic YTpiOmM="); // a:b:c
        assert_eq!(basic(&v), Some(("a".into(), "b:c".into())));
        assert_eq!(basic(&HeaderValue::from_static("Bearer x")), None);
    }
}
