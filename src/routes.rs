//! The compiled route table.
//!
//! Rules are compiled once into two hash indexes: exact host → route indices, and `*.suffix`
//! → route indices (each list ascending). A lookup probes the exact host, then each of the
//! host's label suffixes, and keeps the lowest matching index, so first-match-wins holds across
//! both kinds and the cost depends on the host's label count, not on the number of rules.
//! Nothing on the lookup path allocates.

use std::collections::HashMap;
use std::fmt::Write as _;

use http::Method;

use crate::config::{Config, ConfigError, RouteConfig};

/// What a matched route does to a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Inject an access token of the named identity.
    Access { identity: String },
    /// Inject an ID token of the named identity for an audience.
    IdToken {
        identity: String,
        audience: String,
        include_email: bool,
    },
    /// Forward without touching `Authorization`.
    Passthrough,
}

impl Action {
    /// The identity a route acts as, if any.
    pub fn identity(&self) -> Option<&str> {
        match self {
            Action::Access { identity } | Action::IdToken { identity, .. } => Some(identity),
            Action::Passthrough => None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Route {
    pub name: String,
    pub action: Action,
    /// The pattern as written, for `check`.
    pub host: String,
    path: PathPattern,
    methods: Methods,
}

#[derive(Debug, Clone)]
enum PathPattern {
    Any,
    Prefix(String),
    /// Literal pieces between `*`s; the first is anchored at the start, the last at the end.
    Glob(Vec<String>),
}

impl PathPattern {
    fn compile(p: Option<&str>) -> Result<PathPattern, String> {
        let Some(p) = p else {
            return Ok(PathPattern::Any);
        };
        if !p.starts_with('/') {
            return Err("must start with `/`".into());
        }
        if p.contains('*') {
            Ok(PathPattern::Glob(
                p.split('*').map(str::to_string).collect(),
            ))
        } else if p == "/" {
            Ok(PathPattern::Any)
        } else {
            Ok(PathPattern::Prefix(p.to_string()))
        }
    }

    fn matches(&self, path: &str) -> bool {
        match self {
            PathPattern::Any => true,
            PathPattern::Prefix(p) => path.starts_with(p.as_str()),
            PathPattern::Glob(parts) => glob_match(parts, path),
        }
    }
}

/// `parts` come from splitting the pattern on `*`, so there are at least two of them.
fn glob_match(parts: &[String], path: &str) -> bool {
    let (Some(first), Some(last)) = (parts.first(), parts.last()) else {
        return false;
    };
    let Some(mut rest) = path.strip_prefix(first.as_str()) else {
        return false;
    };
    let middle = &parts[1..parts.len() - 1];
    for piece in middle {
        match rest.find(piece.as_str()) {
            Some(i) => rest = &rest[i + piece.len()..],
            None => return false,
        }
    }
    rest.len() >= last.len() && rest.ends_with(last.as_str())
}

/// Standard methods as bits; anything else kept by name.
#[derive(Debug, Clone)]
enum Methods {
    All,
    Set { bits: u16, other: Vec<Method> },
}

const STANDARD: [Method; 9] = [
    Method::GET,
    Method::HEAD,
    Method::POST,
    Method::PUT,
    Method::DELETE,
    Method::PATCH,
    Method::OPTIONS,
    Method::CONNECT,
    Method::TRACE,
];

fn method_bit(m: &Method) -> Option<u16> {
    STANDARD.iter().position(|s| s == m).map(|i| 1u16 << i)
}

impl Methods {
    fn compile(names: &[String]) -> Result<Methods, String> {
        if names.is_empty() {
            return Ok(Methods::All);
        }
        let mut bits = 0;
        let mut other = Vec::new();
        for (i, n) in names.iter().enumerate() {
            let m = Method::from_bytes(n.to_ascii_uppercase().as_bytes())
                .map_err(|_| format!("entry {i} is not an HTTP method"))?;
            match method_bit(&m) {
                Some(b) => bits |= b,
                None => other.push(m),
            }
        }
        Ok(Methods::Set { bits, other })
    }

    fn matches(&self, m: &Method) -> bool {
        match self {
            Methods::All => true,
            Methods::Set { bits, other } => match method_bit(m) {
                Some(b) => bits & b != 0,
                None => other.contains(m),
            },
        }
    }
}

/// A set of route indexes (the routes a client may use), as bits: testing one is a shift and
/// a mask.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteSet {
    All,
    Some(Box<[u64]>),
}

impl RouteSet {
    /// An empty set for a table of `len` routes.
    pub fn none(len: usize) -> RouteSet {
        RouteSet::Some(vec![0u64; len.div_ceil(64)].into_boxed_slice())
    }

    pub fn insert(&mut self, i: usize) {
        if let RouteSet::Some(bits) = self {
            if let Some(w) = bits.get_mut(i / 64) {
                *w |= 1 << (i % 64);
            }
        }
    }

    #[inline]
    pub fn contains(&self, i: usize) -> bool {
        match self {
            RouteSet::All => true,
            RouteSet::Some(bits) => bits.get(i / 64).is_some_and(|w| w & (1 << (i % 64)) != 0),
        }
    }
}

#[derive(Debug, Default)]
pub struct RouteTable {
    routes: Vec<Route>,
    exact: HashMap<String, Vec<usize>>,
    /// Keyed by the part after `*.`.
    suffix: HashMap<String, Vec<usize>>,
}

impl RouteTable {
    /// Compile the config's routes. `host` arguments below are lower-case, without port.
    pub fn compile(config: &Config) -> Result<RouteTable, ConfigError> {
        let mut table = RouteTable::default();
        for (i, r) in config.routes.iter().enumerate() {
            let invalid = |k: &str, message: String| ConfigError::Invalid {
                file: "routes".into(),
                key: format!("routes[{i}].{k}"),
                message,
            };
            let host = r.host.trim_end_matches('.').to_ascii_lowercase();
            let (map, key) = match host.strip_prefix("*.") {
                Some(rest) => (&mut table.suffix, rest.to_string()),
                None => (&mut table.exact, host.clone()),
            };
            validate_host(&key).map_err(|m| invalid("host", m))?;
            map.entry(key).or_default().push(i);
            table.routes.push(Route {
                name: config.route_name(i),
                action: action(r),
                host: r.host.clone(),
                path: PathPattern::compile(r.path.as_deref()).map_err(|m| invalid("path", m))?,
                methods: Methods::compile(&r.methods).map_err(|m| invalid("methods", m))?,
            });
        }
        Ok(table)
    }

    /// Does any route name this host (so CONNECT to it is intercepted)?
    pub fn routes_host(&self, host: &str) -> bool {
        let host = host.strip_suffix('.').unwrap_or(host);
        self.exact.contains_key(host) || self.suffixes(host).next().is_some()
    }

    /// Index of the first route matching host, path (without query) and method.
    pub fn find(&self, host: &str, path: &str, method: &Method) -> Option<usize> {
        self.find_in(host, path, method, &RouteSet::All)
    }

    /// [`RouteTable::find`] among the routes in `allowed` only (a client's routes).
    pub fn find_in(
        &self,
        host: &str,
        path: &str,
        method: &Method,
        allowed: &RouteSet,
    ) -> Option<usize> {
        let host = host.strip_suffix('.').unwrap_or(host);
        let hit = |list: &Vec<usize>| {
            list.iter().copied().find(|&i| {
                let r = &self.routes[i];
                allowed.contains(i) && r.methods.matches(method) && r.path.matches(path)
            })
        };
        let mut best = self.exact.get(host).and_then(hit);
        for list in self.suffixes(host) {
            if let Some(i) = hit(list) {
                best = Some(best.map_or(i, |b| b.min(i)));
            }
        }
        best
    }

    /// The route lists of every `*.suffix` pattern that covers `host`.
    fn suffixes<'a>(&'a self, host: &'a str) -> impl Iterator<Item = &'a Vec<usize>> + 'a {
        // Not from a leading dot: an empty label is no subdomain.
        host.match_indices('.')
            .filter(|(i, _)| *i > 0)
            .filter_map(move |(i, _)| self.suffix.get(&host[i + 1..]))
    }

    pub fn get(&self, index: usize) -> Option<&Route> {
        self.routes.get(index)
    }

    pub fn len(&self) -> usize {
        self.routes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Route> {
        self.routes.iter()
    }

    /// One line per route, for `check`.
    pub fn describe(&self) -> String {
        let mut out = String::new();
        for (i, r) in self.routes.iter().enumerate() {
            let path = match &r.path {
                PathPattern::Any => "/*".to_string(),
                PathPattern::Prefix(p) => format!("{p}…"),
                PathPattern::Glob(parts) => parts.join("*"),
            };
            let methods = match &r.methods {
                Methods::All => "any method".to_string(),
                Methods::Set { bits, other } => STANDARD
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| bits & (1 << i) != 0)
                    .map(|(_, m)| m.as_str())
                    .chain(other.iter().map(Method::as_str))
                    .collect::<Vec<_>>()
                    .join(","),
            };
            let action = match &r.action {
                Action::Access { identity } => format!("access token of `{identity}`"),
                Action::IdToken {
                    identity, audience, ..
                } => format!("ID token of `{identity}` for {audience}"),
                Action::Passthrough => "passthrough".to_string(),
            };
            let _ = writeln!(
                out,
                "  {:>2}. {:<20} {} {} [{}] → {}",
                i + 1,
                r.name,
                r.host,
                path,
                methods,
                action
            );
        }
        out
    }
}

fn action(r: &RouteConfig) -> Action {
    match (&r.identity, &r.id_token) {
        (Some(identity), _) => Action::Access {
            identity: identity.clone(),
        },
        (None, Some(t)) => Action::IdToken {
            identity: t.identity.clone(),
            audience: t.audience.clone(),
            include_email: t.include_email,
        },
        (None, None) => Action::Passthrough,
    }
}

fn validate_host(h: &str) -> Result<(), String> {
    let ok = !h.is_empty()
        && h.len() <= 253
        && h.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        });
    if ok {
        Ok(())
    } else {
        Err("not a host name or `*.domain` pattern (a `*` may only lead)".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(routes: &str) -> RouteTable {
        let y = format!(
            "identities:\n  a: {{ service_account: a@p.iam.gserviceaccount.com }}\n  b: {{ service_account: b@p.iam.gserviceaccount.com }}\nroutes:\n{routes}"
        );
        RouteTable::compile(&Config::from_yaml(&y, "t").unwrap()).unwrap()
    }

    #[test]
    fn first_match_wins_across_exact_and_suffix() {
        let t = table(
            "  - { host: '*.googleapis.com', identity: a }\n  - { host: storage.googleapis.com, identity: b }\n",
        );
        assert_eq!(t.find("storage.googleapis.com", "/", &Method::GET), Some(0));
        let t = table(
            "  - { host: storage.googleapis.com, identity: b }\n  - { host: '*.googleapis.com', identity: a }\n",
        );
        assert_eq!(t.find("storage.googleapis.com", "/", &Method::GET), Some(0));
        assert_eq!(
            t.find("bigquery.googleapis.com", "/", &Method::GET),
            Some(1)
        );
        assert_eq!(t.find("a.b.c.googleapis.com", "/", &Method::GET), Some(1));
    }

    #[test]
    fn suffix_does_not_match_the_bare_domain_or_lookalikes() {
        let t = table("  - { host: '*.googleapis.com', identity: a }\n");
        assert!(!t.routes_host("googleapis.com"));
        assert!(!t.routes_host("evilgoogleapis.com"));
        assert!(!t.routes_host("googleapis.com.evil.net"));
        assert!(t.routes_host("x.googleapis.com"));
        assert!(t.routes_host("x.googleapis.com."));
    }

    /// Found by the `routes` fuzz target: `.googleapis.com` (a CONNECT to it, an empty first
    /// label) was taken as a subdomain of `*.googleapis.com`, intercepted and given its token.
    #[test]
    fn a_leading_dot_is_no_subdomain() {
        let t = table("  - { host: '*.googleapis.com', identity: a }\n");
        for host in [".googleapis.com", ".googleapis.com."] {
            assert!(!t.routes_host(host), "{host}");
            assert_eq!(t.find(host, "/", &Method::GET), None, "{host}");
        }
    }

    #[test]
    fn glob_prefix_and_methods() {
        let t = table(
            "  - { host: storage.googleapis.com, path: '/storage/v1/b/prod-*', methods: [get, HEAD], identity: a }\n  - { host: storage.googleapis.com, path: /upload/, identity: b }\n",
        );
        let s = "storage.googleapis.com";
        assert_eq!(
            t.find(s, "/storage/v1/b/prod-logs/o/x", &Method::GET),
            Some(0)
        );
        assert_eq!(t.find(s, "/storage/v1/b/prod-logs", &Method::HEAD), Some(0));
        assert_eq!(t.find(s, "/storage/v1/b/prod-logs", &Method::POST), None);
        assert_eq!(t.find(s, "/storage/v1/b/dev-logs", &Method::GET), None);
        assert_eq!(t.find(s, "/upload/storage/v1/b/x", &Method::POST), Some(1));
        // Routed host, unmatched path: intercepted, but no identity.
        assert!(t.routes_host(s));
        assert_eq!(t.find(s, "/other", &Method::GET), None);
    }

    #[test]
    fn glob_with_several_stars() {
        let parts: Vec<String> = "/v1/*/x/*.json".split('*').map(String::from).collect();
        assert!(glob_match(&parts, "/v1/a/b/x/c.json"));
        assert!(!glob_match(&parts, "/v1/a/b/x/c.jsonl"));
        assert!(!glob_match(&parts, "/v2/a/x/c.json"));
        let parts: Vec<String> = "/ab*ba".split('*').map(String::from).collect();
        assert!(!glob_match(&parts, "/aba"), "pieces must not overlap");
        assert!(glob_match(&parts, "/abba"));
    }

    #[test]
    fn grpc_method_paths_route_separately() {
        let t = table(
            "  - { host: pubsub.googleapis.com, path: '/google.pubsub.v1.Publisher/*', identity: a }\n  - { host: pubsub.googleapis.com, path: '/google.pubsub.v1.Subscriber/*', identity: b }\n",
        );
        let h = "pubsub.googleapis.com";
        assert_eq!(
            t.find(h, "/google.pubsub.v1.Publisher/Publish", &Method::POST),
            Some(0)
        );
        assert_eq!(
            t.find(h, "/google.pubsub.v1.Subscriber/Pull", &Method::POST),
            Some(1)
        );
    }

    #[test]
    fn invalid_patterns_are_refused_naming_the_key() {
        for (routes, key) in [
            (
                "  - { host: 'storage.*.com', identity: a }\n",
                "routes[0].host",
            ),
            ("  - { host: '', identity: a }\n", "routes[0].host"),
            (
                "  - { host: a.com, path: 'no-slash', identity: a }\n",
                "routes[0].path",
            ),
            (
                "  - { host: a.com, methods: ['GE T'], identity: a }\n",
                "routes[0].methods",
            ),
        ] {
            let y = format!(
                "identities:\n  a: {{ service_account: a@p.iam.gserviceaccount.com }}\nroutes:\n{routes}"
            );
            // Loading the config already compiles the table, and names the file.
            let err = Config::from_yaml(&y, "conf.yaml").unwrap_err().to_string();
            assert!(
                err.contains(key) && err.starts_with("conf.yaml: "),
                "{routes}: {err}"
            );
        }
    }

    #[test]
    fn actions_and_description() {
        let t = table(
            "  - { host: a.run.app, id_token: { identity: a, audience: 'https://a.run.app' } }\n  - { host: b.example.com, passthrough: true }\n",
        );
        assert_eq!(
            t.get(0).unwrap().action,
            Action::IdToken {
                identity: "a".into(),
                audience: "https://a.run.app".into(),
                include_email: true
            }
        );
        assert_eq!(t.get(1).unwrap().action, Action::Passthrough);
        let d = t.describe();
        assert!(
            d.contains("route-1") && d.contains("ID token of `a`"),
            "{d}"
        );
    }
}
