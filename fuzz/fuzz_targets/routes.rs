//! Route patterns compiled into the route table, and lookups in it, against a plain reading of
//! the README's rules: first match wins; `*.domain` covers subdomains only; a path without `*`
//! is a prefix, with `*` a glob over the whole path; methods by name, any when none are given.
//!
//! Input, one item per line: a route `HOST [PATH|-] [METHOD,…|-]`, a request `> HOST PATH
//! METHOD`, or `allow I J …` (the routes a client may use, for the requests after it).
#![no_main]

use http::Method;
use impersonate_proxy::config::{Config, RouteConfig};
use impersonate_proxy::routes::{RouteSet, RouteTable};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    let mut routes = Vec::new();
    let mut requests = Vec::new();
    for line in text.lines().take(64) {
        let mut words = line.split_whitespace();
        match words.next() {
            Some(">") => {
                let host = words.next().unwrap_or_default().to_ascii_lowercase();
                let path = words.next().unwrap_or_default().to_string();
                let method = words.next().unwrap_or("GET").to_string();
                requests.push(Request::Lookup(host, path, method));
            }
            Some("allow") => requests.push(Request::Allow(
                words.filter_map(|w| w.parse().ok()).collect(),
            )),
            Some(host) => {
                let path = words.next().filter(|p| *p != "-").map(str::to_string);
                let methods = match words.next() {
                    Some("-") | None => Vec::new(),
                    Some(m) => m.split(',').map(str::to_string).collect(),
                };
                routes.push(RouteConfig {
                    name: None,
                    host: host.to_string(),
                    path,
                    methods,
                    identity: None,
                    id_token: None,
                    passthrough: true,
                    clients: Vec::new(),
                });
            }
            None => {}
        }
    }
    let config = Config {
        routes,
        ..Config::default()
    };
    let Ok(table) = RouteTable::compile(&config) else {
        return;
    };
    assert_eq!(table.len(), config.routes.len());
    let _ = table.describe();
    let mut allowed = RouteSet::All;
    for r in requests {
        let (host, path, method) = match r {
            Request::Allow(list) => {
                allowed = RouteSet::none(table.len());
                for i in list.into_iter().filter(|i| *i < 4096) {
                    allowed.insert(i);
                }
                continue;
            }
            Request::Lookup(h, p, m) => (h, p, m),
        };
        let Ok(method) = Method::from_bytes(method.as_bytes()) else {
            continue;
        };
        let expected = config.routes.iter().enumerate().position(|(i, r)| {
            allowed.contains(i)
                && host_matches(&r.host, &host)
                && path_matches(r.path.as_deref(), &path)
                && method_matches(&r.methods, &method)
        });
        let found = table.find_in(&host, &path, &method, &allowed);
        assert_eq!(found, expected, "{host} {path} {method}");
        let named = config.routes.iter().any(|r| host_matches(&r.host, &host));
        assert_eq!(table.routes_host(&host), named, "{host}");
    }
});

enum Request {
    Lookup(String, String, String),
    Allow(Vec<usize>),
}

fn host_matches(pattern: &str, host: &str) -> bool {
    let pattern = pattern.trim_end_matches('.').to_ascii_lowercase();
    let host = host.strip_suffix('.').unwrap_or(host);
    match pattern.strip_prefix("*.") {
        Some(domain) => host
            .strip_suffix(domain)
            .is_some_and(|sub| sub.len() > 1 && sub.ends_with('.')),
        None => pattern == host,
    }
}

fn path_matches(pattern: Option<&str>, path: &str) -> bool {
    match pattern {
        None | Some("/") => true,
        Some(p) if !p.contains('*') => path.starts_with(p),
        Some(p) => glob(p.as_bytes(), path.as_bytes()),
    }
}

/// `*` matches any run of bytes, everything else itself; by dynamic programming over prefixes.
fn glob(pattern: &[u8], s: &[u8]) -> bool {
    // m[j]: the pattern so far matches s[..j].
    let mut m = vec![false; s.len() + 1];
    m[0] = true;
    for &p in pattern {
        if p == b'*' {
            for j in 1..=s.len() {
                m[j] = m[j] || m[j - 1];
            }
        } else {
            for j in (1..=s.len()).rev() {
                m[j] = m[j - 1] && s[j - 1] == p;
            }
            m[0] = false;
        }
    }
    m[s.len()]
}

fn method_matches(names: &[String], method: &Method) -> bool {
    names.is_empty()
        || names.iter().any(|n| {
            Method::from_bytes(n.to_ascii_uppercase().as_bytes())
                .ok()
                .as_ref()
                == Some(method)
        })
}
