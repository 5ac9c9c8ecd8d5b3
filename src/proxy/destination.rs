//! Where the proxy may connect, and the one dialer that blind tunnels and the upstream client
//! share.
//!
//! By default no connection goes to an internal address: loopback, link-local (which holds
//! the cloud metadata server, 169.254.169.254), private (RFC 1918, ULA `fc00::/7`),
//! unspecified or multicast. The check runs on each address the dialer is about to connect
//! to, after DNS, so a name that resolves (or rebinds) to an internal address is refused like
//! the address itself; an IPv4 address inside IPv6 (`::ffff:127.0.0.1`) counts as the IPv4
//! one. Two things open a hole on purpose:
//!
//! - `upstream.allow_internal`: CIDRs (`10.1.0.0/16`, or one address) whose addresses may be
//!   connected to, and host names (`internal.example.com`, or `*.corp.example.com` for its
//!   subdomains) that may connect wherever they resolve.
//! - `upstream.resolve`: a `host:port` the operator mapped to an address connects there,
//!   whatever the address is; writing the mapping is the deliberate choice.
//! - The machine's hosts file (`/etc/hosts`), for the hosts a route names, read at start-up:
//!   only the machine's owner writes it (Kubernetes' `hostAliases` too), so a routed host it
//!   maps to an internal address (a private endpoint, a local stand-in) is a choice like a
//!   `resolve` entry. DNS answers are not; blind tunnels and unrouted hosts never use this;
//!   `localhost` names never count.
//!
//! The check costs one comparison per address of each new connection, never anything per
//! request on a connection already open.
//!
//! Whatever opens a hole, no connection goes to one of the proxy's own listening sockets (the
//! listener and the transparent one; for a wildcard address, any local address with its
//! port): with the hosts file pointing a host at the transparent listener, resolving that host
//! gives the proxy its own address back, and connecting there would loop.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use tokio::net::TcpStream;

use super::upstream::Overrides;
use crate::config::UpstreamConfig;

/// Why a connect did not happen. The access log gets all of it; a client only "refused" or
/// "unreachable".
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    #[error("{addr} is an internal address (loopback, link-local, private, unspecified or multicast); upstream.allow_internal would open it")]
    Internal { addr: IpAddr },
    #[error("cannot resolve: {0}")]
    Resolve(std::io::Error),
    #[error("{0}")]
    Connect(std::io::Error),
    #[error("connect timed out after {0}")]
    Timeout(String),
    #[error("{addr} is this proxy's own listener: connecting would loop back into the proxy (map the host's real address with upstream.resolve)")]
    Loop { addr: SocketAddr },
}

/// A network: an address and how many leading bits of it count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    net: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// `10.0.0.0/8`, `fd00::/8`, or one address (`127.0.0.1`, `::1`); used by
    /// `upstream.allow_internal` and by clients' `cidrs` alike.
    pub fn parse(s: &str) -> Option<Cidr> {
        let (addr, prefix) = match s.trim().split_once('/') {
            Some((a, p)) => (a.trim(), Some(p.trim().parse::<u8>().ok()?)),
            None => (s.trim(), None),
        };
        let net: IpAddr = addr
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse()
            .ok()?;
        let max = if net.is_ipv4() { 32 } else { 128 };
        let prefix = prefix.unwrap_or(max);
        if prefix > max {
            return None;
        }
        // An IPv4 network written in IPv4-mapped form (`::ffff:10.0.0.0/104`) is that IPv4
        // network: `contains` sees such addresses as IPv4, so kept as IPv6 it held nothing,
        // not even the address it was written with.
        if let IpAddr::V6(v6) = net {
            if let (Some(v4), true) = (v6.to_ipv4_mapped(), prefix >= 96) {
                return Some(Cidr {
                    net: IpAddr::V4(v4),
                    prefix: prefix - 96,
                });
            }
        }
        Some(Cidr { net, prefix })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.net, canonical(ip)) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                prefix_eq(&n.octets(), &a.octets(), u32::from(self.prefix))
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                prefix_eq(&n.octets(), &a.octets(), u32::from(self.prefix))
            }
            // A network written in IPv4-mapped form with a prefix under 96 (`parse` makes the
            // longer ones IPv4): an IPv4 address counts in its mapped form, so that the network
            // holds the address it was written with. Other IPv6 networks (`::/0` included)
            // hold no IPv4 address, as before.
            (IpAddr::V6(n), IpAddr::V4(a)) if n.to_ipv4_mapped().is_some() => prefix_eq(
                &n.octets(),
                &a.to_ipv6_mapped().octets(),
                u32::from(self.prefix),
            ),
            _ => false,
        }
    }
}

/// The first `bits` bits of `a` and `b` are equal.
fn prefix_eq(a: &[u8], b: &[u8], bits: u32) -> bool {
    let whole = (bits / 8) as usize;
    if a[..whole] != b[..whole] {
        return false;
    }
    let rest = bits % 8;
    if rest == 0 {
        return true;
    }
    let mask = 0xffu8 << (8 - rest);
    (a[whole] & mask) == (b[whole] & mask)
}

/// An IPv4 address carried in IPv6 (`::ffff:a.b.c.d`) is that IPv4 address.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        },
        v4 => v4,
    }
}

/// Loopback, link-local, private, unspecified or multicast: refused unless allowed.
pub fn is_internal(ip: IpAddr) -> bool {
    match canonical(ip) {
        IpAddr::V4(a) => {
            a.is_loopback()
                || a.is_link_local()
                || a.is_private()
                || a.is_multicast()
                || a.is_broadcast()
                // 0.0.0.0/8, "this network": Linux connects 0.0.0.0 to the local host.
                || a.octets()[0] == 0
        }
        IpAddr::V6(a) => {
            a.is_loopback()
                || a.is_unspecified()
                || a.is_multicast()
                // fe80::/10, link-local.
                || (a.segments()[0] & 0xffc0) == 0xfe80
                // fc00::/7, unique local.
                || (a.segments()[0] & 0xfe00) == 0xfc00
        }
    }
}

/// The connect policy and the `resolve` map, built once from the config.
pub struct Destinations {
    overrides: Overrides,
    /// Routed hosts the hosts file maps, and their addresses (see the module documentation).
    hosts_file: std::collections::HashMap<String, Vec<IpAddr>>,
    nets: Vec<Cidr>,
    /// Exact names, lower-case; a `*.suffix` entry is kept as `.suffix`.
    hosts: Vec<String>,
    connect_timeout: Duration,
    /// The proxy's own listening sockets, once bound: never connected to.
    own: std::sync::OnceLock<Vec<SocketAddr>>,
}

impl Destinations {
    pub fn from_config(cfg: &UpstreamConfig) -> Destinations {
        let mut nets = Vec::new();
        let mut hosts = Vec::new();
        // Entries were checked when the config loaded.
        for entry in &cfg.allow_internal {
            match Cidr::parse(entry) {
                Some(c) => nets.push(c),
                None => {
                    let h = entry.trim_end_matches('.').to_ascii_lowercase();
                    hosts.push(h.strip_prefix('*').map(str::to_string).unwrap_or(h));
                }
            }
        }
        Destinations {
            overrides: Overrides::from_config(cfg),
            hosts_file: Default::default(),
            nets,
            hosts,
            connect_timeout: cfg.connect_timeout,
            own: std::sync::OnceLock::new(),
        }
    }

    /// The addresses the proxy listens on, once bound; connecting to any of them is refused
    /// from then on. Set once; a second call is ignored.
    pub fn set_own_listeners(&self, addrs: Vec<SocketAddr>) {
        let _ = self.own.set(addrs);
    }

    /// `addr` reaches one of the proxy's own listeners.
    fn is_own(&self, addr: SocketAddr) -> bool {
        let Some(own) = self.own.get() else {
            return false;
        };
        let ip = match canonical(addr.ip()) {
            // Linux connects 0.0.0.0 (and ::) to the local host.
            ip if ip.is_unspecified() => IpAddr::from([127, 0, 0, 1]),
            ip => ip,
        };
        own.iter().any(|l| {
            l.port() == addr.port()
                && (canonical(l.ip()) == ip || (l.ip().is_unspecified() && is_local(ip)))
        })
    }

    /// Refuse `addr` if it is one of the proxy's own listeners.
    fn not_own(&self, addr: SocketAddr) -> Result<SocketAddr, DialError> {
        if self.is_own(addr) {
            Err(DialError::Loop { addr })
        } else {
            Ok(addr)
        }
    }

    /// Take the entries of a hosts file (its text) for the hosts `routed` says a route names,
    /// never `localhost` names.
    pub fn with_hosts_file(mut self, text: &str, routed: impl Fn(&str) -> bool) -> Destinations {
        for line in text.lines() {
            let line = line.split('#').next().unwrap_or_default();
            let mut fields = line.split_whitespace();
            let Some(Ok(ip)) = fields.next().map(str::parse::<IpAddr>) else {
                continue;
            };
            for name in fields {
                let name = name.trim_end_matches('.').to_ascii_lowercase();
                let local =
                    name == "localhost" || name.ends_with(".localhost") || name.starts_with("ip6-");
                if !local && routed(&name) {
                    self.hosts_file.entry(name).or_default().push(ip);
                }
            }
        }
        self
    }

    /// `upstream.allow_internal` names `host` (lower-case, no brackets).
    fn allows_host(&self, host: &str) -> bool {
        self.hosts.iter().any(|h| match h.strip_prefix('.') {
            Some(_) => host.ends_with(h.as_str()),
            None => h == host,
        })
    }

    /// Whether `ip` may be connected to for a host that `allow_internal` does not name.
    pub fn allows(&self, ip: IpAddr) -> bool {
        !is_internal(ip) || self.nets.iter().any(|n| n.contains(ip))
    }

    /// Connect to `host:port` (`host` lower-case; an IPv6 literal with or without brackets):
    /// its `upstream.resolve` address if it has one, else each address DNS gives that the
    /// policy allows, in turn, all within `upstream.connect_timeout`.
    pub async fn dial(&self, host: &str, port: u16) -> Result<TcpStream, DialError> {
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        let timeout = self.connect_timeout;
        match tokio::time::timeout(timeout, self.connect(host, port)).await {
            Ok(Ok(s)) => {
                let _ = s.set_nodelay(true);
                Ok(s)
            }
            Ok(Err(e)) => Err(e),
            Err(_) => Err(DialError::Timeout(crate::config::show(timeout))),
        }
    }

    async fn connect(&self, host: &str, port: u16) -> Result<TcpStream, DialError> {
        if let Some(addr) = self.overrides.get(host, port) {
            let addr = self.not_own(addr)?;
            return TcpStream::connect(addr).await.map_err(DialError::Connect);
        }
        if let Some(ips) = self.hosts_file.get(host) {
            let mut failed = None;
            for ip in ips {
                let addr = self.not_own(SocketAddr::new(*ip, port))?;
                match TcpStream::connect(addr).await {
                    Ok(s) => return Ok(s),
                    Err(e) => failed = Some(DialError::Connect(e)),
                }
            }
            if let Some(e) = failed {
                return Err(e);
            }
        }
        let named = self.allows_host(host);
        let check = |addr: SocketAddr| self.check(named, addr);
        if let Ok(ip) = host.parse::<IpAddr>() {
            let addr = check(SocketAddr::new(ip, port))?;
            return TcpStream::connect(addr).await.map_err(DialError::Connect);
        }
        let addrs = tokio::net::lookup_host((host, port))
            .await
            .map_err(DialError::Resolve)?;
        // A connect failure says more than a refusal when a name has both kinds of address.
        let mut refused = None;
        let mut failed = None;
        for addr in addrs {
            match check(addr) {
                Ok(addr) => match TcpStream::connect(addr).await {
                    Ok(s) => return Ok(s),
                    Err(e) => failed = Some(DialError::Connect(e)),
                },
                Err(e) => refused = Some(e),
            }
        }
        Err(failed.or(refused).unwrap_or_else(|| {
            DialError::Resolve(std::io::Error::other("the name has no address"))
        }))
    }
}

impl Destinations {
    /// Whether `addr` may be connected to for a host (`named`: one `allow_internal` names).
    fn check(&self, named: bool, addr: SocketAddr) -> Result<SocketAddr, DialError> {
        let addr = self.not_own(addr)?;
        if named || self.allows(addr.ip()) {
            Ok(addr)
        } else {
            Err(DialError::Internal { addr: addr.ip() })
        }
    }

    /// Connect to `addr` for `host` (where an iptables `REDIRECT` says the client was going),
    /// under the same policy as an address DNS gave for `host`.
    pub async fn dial_addr(&self, host: &str, addr: SocketAddr) -> Result<TcpStream, DialError> {
        let addr = self.check(self.allows_host(host), addr)?;
        let timeout = self.connect_timeout;
        match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
            Ok(Ok(s)) => {
                let _ = s.set_nodelay(true);
                Ok(s)
            }
            Ok(Err(e)) => Err(DialError::Connect(e)),
            Err(_) => Err(DialError::Timeout(crate::config::show(timeout))),
        }
    }
}

/// `ip` is an address of this machine: loopback, or one a socket can be bound to.
fn is_local(ip: IpAddr) -> bool {
    ip.is_loopback() || std::net::UdpSocket::bind(SocketAddr::new(ip, 0)).is_ok()
}

/// An `upstream.allow_internal` entry: a CIDR, an address, a host name or `*.` and a domain.
pub fn valid_allow_entry(s: &str) -> bool {
    if Cidr::parse(s).is_some() {
        return true;
    }
    let name = s.strip_prefix("*.").unwrap_or(s);
    let name = name.strip_suffix('.').unwrap_or(name);
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn internal_addresses_are_the_documented_ones() {
        for a in [
            "127.0.0.1",
            "127.8.9.10",
            "10.0.0.1",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "169.254.169.254",
            "0.0.0.0",
            "224.0.0.1",
            "255.255.255.255",
            "::1",
            "::",
            "fe80::1",
            "fd00::1",
            "fc00::1",
            "ff02::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
        ] {
            assert!(is_internal(ip(a)), "{a}");
        }
        for a in [
            "8.8.8.8",
            "142.250.1.1",
            "172.32.0.1",
            "11.0.0.1",
            "2607:f8b0::1",
            "::ffff:8.8.8.8",
        ] {
            assert!(!is_internal(ip(a)), "{a}");
        }
    }

    #[test]
    fn cidrs_and_names_open_holes() {
        let cfg = UpstreamConfig {
            allow_internal: vec![
                "10.1.0.0/16".into(),
                "::1".into(),
                "internal.example.com".into(),
                "*.corp.example.com".into(),
            ],
            ..UpstreamConfig::default()
        };
        let d = Destinations::from_config(&cfg);
        assert!(d.allows(ip("10.1.200.3")));
        assert!(!d.allows(ip("10.2.0.1")));
        assert!(d.allows(ip("::1")));
        assert!(!d.allows(ip("127.0.0.1")));
        assert!(d.allows(ip("8.8.8.8")));
        assert!(d.allows_host("internal.example.com"));
        assert!(d.allows_host("a.corp.example.com"));
        assert!(!d.allows_host("corp.example.com.evil.com"));
        assert!(!d.allows_host("evilinternal.example.com"));
        assert_eq!(Cidr::parse("10.0.0.0/33"), None);
        assert!(Cidr::parse("fd00::/8").unwrap().contains(ip("fdff::1")));
        assert!(Cidr::parse("0.0.0.0/0").unwrap().contains(ip("127.0.0.1")));
        // IPv4-mapped networks are the IPv4 networks they map, both ways; with a prefix under
        // 96 an IPv6 network that holds IPv4 addresses in mapped form. The second and the
        // fourth are inputs cargo fuzz found (request_target).
        let mapped = Cidr::parse("::ffff:10.0.0.0/104").unwrap();
        assert!(mapped.contains(ip("10.1.2.3")) && mapped.contains(ip("::ffff:10.1.2.3")));
        assert!(!mapped.contains(ip("11.0.0.1")));
        let found = Cidr::parse("\u{a0}\u{a0}::ffff:ffff:127").unwrap();
        assert!(found.contains(ip("::ffff:ffff:127")) && found.contains(ip("255.255.1.39")));
        assert!(!Cidr::parse("::/0").unwrap().contains(ip("10.0.0.1")));
        let short = Cidr::parse("\u{a0}::ffff:10.0.70.0/8").unwrap();
        assert!(short.contains(ip("::ffff:10.0.70.0")) && short.contains(ip("10.9.9.9")));
        assert!(short.contains(ip("::1")) && !short.contains(ip("fd00::1")));
        for ok in ["10.0.0.0/8", "::1/128", "a.b", "*.corp.example.com", "host"] {
            assert!(valid_allow_entry(ok), "{ok}");
        }
        for bad in ["", "10.0.0.0/40", "a b", "*", "a..b", "http://x"] {
            assert!(!valid_allow_entry(bad), "{bad}");
        }
    }

    #[tokio::test]
    async fn dial_refuses_internal_addresses_unless_allowed_or_resolved() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let d = Destinations::from_config(&UpstreamConfig::default());
        for host in ["127.0.0.1", "localhost", "[::ffff:127.0.0.1]"] {
            let e = d.dial(host, port).await.unwrap_err();
            assert!(matches!(e, DialError::Internal { .. }), "{host}: {e}");
        }
        // A resolve entry is the operator's choice.
        let mut cfg = UpstreamConfig::default();
        cfg.resolve.insert(
            format!("mapped.example.com:{port}"),
            l.local_addr().unwrap(),
        );
        let d = Destinations::from_config(&cfg);
        d.dial("mapped.example.com", port).await.unwrap();
        assert!(d.dial("127.0.0.1", port).await.is_err());
        // As is the hosts file's mapping of a routed host, never of localhost or of a host
        // no route names.
        let hosts = "127.0.0.1 localhost storage.googleapis.com\n10.9.9.9 other.example # x\n";
        let d = Destinations::from_config(&UpstreamConfig::default())
            .with_hosts_file(hosts, |h| h.ends_with("googleapis.com") || h == "localhost");
        d.dial("storage.googleapis.com", port).await.unwrap();
        let e = d.dial("localhost", port).await.unwrap_err();
        assert!(matches!(e, DialError::Internal { .. }), "{e}");
        assert!(!d.hosts_file.contains_key("other.example"));
        // As is allow_internal, by CIDR or by name.
        for entry in ["127.0.0.0/8", "localhost"] {
            let cfg = UpstreamConfig {
                allow_internal: vec![entry.into()],
                ..UpstreamConfig::default()
            };
            let d = Destinations::from_config(&cfg);
            d.dial("localhost", port).await.unwrap();
        }
    }

    #[tokio::test]
    async fn dial_never_connects_to_the_proxys_own_listeners() {
        let own = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let own_addr = own.local_addr().unwrap();
        let other = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let other_addr = other.local_addr().unwrap();
        let mut cfg = UpstreamConfig {
            allow_internal: vec!["127.0.0.0/8".into()],
            ..UpstreamConfig::default()
        };
        cfg.resolve.insert("loop.example.com:443".into(), own_addr);
        let hosts = "127.0.0.1 storage.googleapis.com\n";
        let d = Destinations::from_config(&cfg).with_hosts_file(hosts, |_| true);
        d.set_own_listeners(vec![own_addr]);
        // Whichever way the address comes: a resolve entry, the hosts file, an address, DNS,
        // or a REDIRECT's original destination. Another port on the same address is fine.
        let port = own_addr.port();
        for (host, p) in [
            ("loop.example.com", 443),
            ("storage.googleapis.com", port),
            ("127.0.0.1", port),
            ("[::ffff:127.0.0.1]", port),
            ("localhost", port),
        ] {
            match d.dial(host, p).await {
                Err(DialError::Loop { addr }) => assert_eq!(addr.port(), port, "{host}"),
                other => panic!("{host}:{p}: {other:?}"),
            }
        }
        assert!(matches!(
            d.dial_addr("x.example.com", own_addr).await,
            Err(DialError::Loop { .. })
        ));
        d.dial("127.0.0.1", other_addr.port()).await.unwrap();
        d.dial_addr("x.example.com", other_addr).await.unwrap();

        // A wildcard listener is every local address with its port.
        let d = Destinations::from_config(&cfg);
        d.set_own_listeners(vec![SocketAddr::from(([0, 0, 0, 0], port))]);
        for host in ["127.0.0.1", "127.0.0.2", "0.0.0.0"] {
            let e = d.dial(host, port).await.unwrap_err();
            assert!(matches!(e, DialError::Loop { .. }), "{host}: {e}");
        }
        assert!(!d.is_own(SocketAddr::from(([192, 0, 2, 1], port))));
        d.dial("127.0.0.1", other_addr.port()).await.unwrap();
    }
}
