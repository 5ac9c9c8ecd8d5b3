//! The header rules between the client's leg and the origin's, in all four directions
//! (HTTP/1.1 or h2 client, HTTP/1.1 or h2 origin), written once: [`RULES`] says what happens
//! to each field that is not simply carried end to end, and the functions below apply it.
//!
//! | field | request, client → proxy | towards an HTTP/1.1 origin | towards an h2 origin | response |
//! | --- | --- | --- | --- | --- |
//! | `Host`, `:authority` | one authority, naming the connection's target: two `Host` fields, or none on HTTP/1.1, is a 400 (RFC 9112 §3.2); another host is a 421 (RFC 9110 §15.5.20); on an absolute-form request `Host` is ignored (RFC 9112 §3.2.2) | `Host` built from the target (the HTTP/1.1 pool adds it, `pool.rs`) | `:authority` from the target, no `host` field (RFC 9113 §8.3.1; nginx before 1.25 answers a `host` beside `:authority` with 400) | — |
//! | `Connection` and every field it names, `Keep-Alive`, `Proxy-Connection`, `Transfer-Encoding`, `Upgrade` | dropped (RFC 9110 §7.6.1) | an HTTP/1.1 upgrade is asked for again (`Upgrade`, `Connection: upgrade`) | never sent (RFC 9113 §8.2.2) | dropped; a 101 says `Upgrade` again |
//! | `TE` | kept only as `trailers` | `TE: trailers` | `te: trailers` | dropped |
//! | `Proxy-Authorization`, `Proxy-Authenticate` | the proxy's own; never forwarded | — | — | dropped |
//! | `Metadata-Flavor` | never forwarded: it is what a cloud metadata server asks of a caller before it hands out credentials, and no origin behind the proxy has a use for it | — | — | dropped |
//! | `Cookie` | h2 clients may split it into several fields (RFC 9113 §8.2.3) | joined into one with `; ` | carried as sent | — |
//! | `Content-Length` | kept only if it equals the body's framed length, else dropped (the body is then chunked, or framed by h2) | | | dropped beside `Transfer-Encoding` (RFC 9112 §6.3) |
//!
//! [`RULES`] is the table in code; the unit tests below walk each row. `Authorization` is the
//! route's business (`forward.rs`): on a token route every value is replaced by the token.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{request, Version};

use super::error::ProxyError;

/// What happens to a field that is not carried end to end as is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Rule {
    /// Describes one connection, never the message: dropped on every leg, both ways.
    HopByHop,
    /// `TE`: only `trailers` survives (gRPC needs it end to end).
    TrailersOnly,
    /// `Host`: checked against the connection's target, then dropped; the upstream leg
    /// builds its own authority from the target.
    Authority,
    /// `Cookie`: joined with `; ` for an HTTP/1.1 origin.
    JoinForHttp1,
    /// `Content-Length`: kept only when it matches the body.
    MatchesBody,
}

/// The table; see the module documentation.
pub(crate) static RULES: [(HeaderName, Rule); 12] = [
    (header::CONNECTION, Rule::HopByHop),
    (HeaderName::from_static("keep-alive"), Rule::HopByHop),
    (HeaderName::from_static("proxy-connection"), Rule::HopByHop),
    (header::TRANSFER_ENCODING, Rule::HopByHop),
    (header::UPGRADE, Rule::HopByHop),
    (header::PROXY_AUTHORIZATION, Rule::HopByHop),
    (header::PROXY_AUTHENTICATE, Rule::HopByHop),
    (HeaderName::from_static("metadata-flavor"), Rule::HopByHop),
    (header::TE, Rule::TrailersOnly),
    (header::HOST, Rule::Authority),
    (header::COOKIE, Rule::JoinForHttp1),
    (header::CONTENT_LENGTH, Rule::MatchesBody),
];

fn is_hop_by_hop(name: &HeaderName) -> bool {
    RULES
        .iter()
        .any(|(n, rule)| *rule == Rule::HopByHop && n == name)
}

/// The authority a connection's requests must name: the CONNECT target (or the absolute-form
/// request's own, when `Host` is ignored).
pub(crate) struct Expected<'a> {
    pub host: &'a str,
    pub port: u16,
    pub default_port: u16,
    /// Absolute-form on the proxy's own listener: the request-target names the authority and
    /// `Host` is ignored (RFC 9112 §3.2.2), though two of them are still a 400.
    pub host_ignored: bool,
}

/// Check the request's authority against the connection's target and take `Host` out: the
/// upstream leg sends the target's authority its own way (see the table). `Err` is the answer
/// the client gets.
pub(crate) fn check_authority(
    parts: &mut request::Parts,
    expected: &Expected<'_>,
) -> Result<(), ProxyError> {
    let mut hosts = parts.headers.get_all(header::HOST).iter();
    let host = hosts.next();
    if hosts.next().is_some() {
        return Err(ProxyError::BadRequest(
            "more than one Host field (RFC 9112 §3.2)".into(),
        ));
    }
    if !expected.host_ignored {
        // An h2 client's `:authority` (or an absolute-form request-target sent inside the
        // intercepted session) arrives as the URI's authority.
        if let Some(auth) = parts.uri.authority() {
            names_target(auth.as_str(), expected)?;
        }
        match host {
            Some(v) => {
                let v = v.to_str().map_err(|_| {
                    ProxyError::BadRequest("the Host field is not a valid authority".into())
                })?;
                names_target(v, expected)?;
            }
            None if parts.version == Version::HTTP_11 && parts.uri.authority().is_none() => {
                return Err(ProxyError::BadRequest(
                    "an HTTP/1.1 request needs a Host field (RFC 9112 §3.2)".into(),
                ))
            }
            None => {}
        }
    }
    if host.is_some() {
        parts.headers.remove(header::HOST);
    }
    Ok(())
}

/// `authority` names the expected host and port (case-insensitively, a trailing dot and a
/// default port allowed); anything else is a 421, or a 400 when it is no authority at all.
/// Runs on every request, so it splits the text in place rather than parsing a `Uri`.
pub(crate) fn names_target(authority: &str, expected: &Expected<'_>) -> Result<(), ProxyError> {
    let malformed = || ProxyError::BadRequest("the request's authority is malformed".into());
    let (host, port) = match authority.strip_prefix('[') {
        // An IPv6 literal: `[addr]` or `[addr]:port`. The brackets stay on the host, as on
        // the target's (the CONNECT authority's host).
        Some(rest) => {
            let (addr, after) = rest.split_once(']').ok_or_else(malformed)?;
            let port = match after {
                "" => None,
                _ => Some(after.strip_prefix(':').ok_or_else(malformed)?),
            };
            (&authority[..addr.len() + 2], port)
        }
        None => match authority.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        },
    };
    // An empty port is the default one (RFC 3986 §6.2.3), as the request-target's is.
    let port = match port.filter(|p| !p.is_empty()) {
        Some(p) => p.parse::<u16>().map_err(|_| malformed())?,
        None => expected.default_port,
    };
    if host.is_empty() {
        return Err(malformed());
    }
    // Trailing dots go as the target's went (`connect::host_port`).
    let host = host.trim_end_matches('.');
    if host.eq_ignore_ascii_case(expected.host) && port == expected.port {
        return Ok(());
    }
    Err(ProxyError::Misdirected {
        named: authority.to_string(),
        target: format!("{}:{}", expected.host, expected.port),
    })
}

/// Remove hop-by-hop fields (RFC 9110 §7.6.1): those named by `Connection`, and the table's
/// fixed set. `TE: trailers` survives, since gRPC needs it end to end. Returns whether the
/// message carried `Transfer-Encoding`.
///
/// Runs on every request and response; most messages (every h2 one, where these fields are
/// illegal) have none, and one pass over the names finds that without hashing each one.
pub(crate) fn strip_hop_by_hop(headers: &mut HeaderMap) -> bool {
    let mut te_is_trailers = true;
    let mut found = false;
    for (name, value) in headers.iter() {
        if name == header::TE {
            te_is_trailers &= value.as_bytes().eq_ignore_ascii_case(b"trailers");
        } else if is_hop_by_hop(name) {
            found = true;
            break;
        }
    }
    if !found && te_is_trailers {
        return false;
    }
    let chunked = headers.contains_key(header::TRANSFER_ENCODING);
    // The fields `Connection` names go, removed by their names as text: no list of them and no
    // `HeaderName` is made (one outside the standard table is an allocation, and nginx's
    // `Connection: keep-alive` came with every answer). Each value walked is a clone, which
    // shares its bytes. `Connection` itself is left to the table's pass below, so the values
    // stay where they are while they are walked; a name that is no field name matches nothing.
    let mut nth = 0;
    while let Some(value) = headers.get_all(header::CONNECTION).iter().nth(nth).cloned() {
        nth += 1;
        let Ok(value) = value.to_str() else {
            continue;
        };
        for name in value.split(',').map(str::trim) {
            if !name.is_empty() && !name.eq_ignore_ascii_case("connection") {
                headers.remove(name);
            }
        }
    }
    let keeps_trailers = headers
        .get_all(header::TE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("trailers"));
    for (name, rule) in &RULES {
        if matches!(rule, Rule::HopByHop | Rule::TrailersOnly) {
            headers.remove(name);
        }
    }
    if keeps_trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
    chunked
}

/// `Content-Length` stays only if it states the body's framed length (`None`: the body's
/// length is not known in advance, as with a chunked upload).
pub(crate) fn match_content_length(headers: &mut HeaderMap, body_len: Option<u64>) {
    let mut values = headers.get_all(header::CONTENT_LENGTH).iter();
    let Some(first) = values.next() else {
        return;
    };
    let states = |v: &HeaderValue| {
        v.to_str()
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .is_some_and(|n| Some(n) == body_len)
    };
    if !states(first) || values.next().is_some() {
        headers.remove(header::CONTENT_LENGTH);
    }
}

/// A response: hop-by-hop fields go, and a `Content-Length` beside `Transfer-Encoding` (which
/// overrides it, RFC 9112 §6.3) goes too.
pub(crate) fn response_from_origin(headers: &mut HeaderMap) {
    if strip_hop_by_hop(headers) {
        headers.remove(header::CONTENT_LENGTH);
    }
}

/// The protocol an HTTP/1.1 client asked to switch to, kept in the request's extensions for
/// the HTTP/1.1 leg; an h2 leg never carries `Upgrade`.
#[derive(Clone)]
pub(crate) struct RequestedUpgrade(pub HeaderValue);

/// What an HTTP/1.1 origin needs beyond the common rewrite: one `Cookie` field, and an
/// upgrade asked for again. (`Host` is added from the URI by the pool, `pool.rs`.)
pub(crate) fn for_http1(headers: &mut HeaderMap, upgrade: Option<&RequestedUpgrade>) {
    join_cookies(headers);
    if let Some(RequestedUpgrade(proto)) = upgrade {
        headers.insert(header::UPGRADE, proto.clone());
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
}

/// Several `Cookie` fields become one, joined with `; ` (RFC 9113 §8.2.3).
fn join_cookies(headers: &mut HeaderMap) {
    let mut cookies = headers.get_all(header::COOKIE).iter();
    let (Some(first), Some(_)) = (cookies.next(), cookies.next()) else {
        return;
    };
    let mut joined = first.as_bytes().to_vec();
    for v in headers.get_all(header::COOKIE).iter().skip(1) {
        joined.extend_from_slice(b"; ");
        joined.extend_from_slice(v.as_bytes());
    }
    // Made of valid field values and "; ", so it is one too.
    if let Ok(v) = HeaderValue::from_bytes(&joined) {
        headers.insert(header::COOKIE, v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::Request;

    fn parts(version: Version, uri: &str, headers: &[(&str, &str)]) -> request::Parts {
        let mut b = Request::builder().version(version).uri(uri);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap().into_parts().0
    }

    const TARGET: Expected<'static> = Expected {
        host: "storage.googleapis.com",
        port: 443,
        default_port: 443,
        host_ignored: false,
    };

    #[test]
    fn authority_row_one_authority_naming_the_target() {
        // HTTP/1.1 with its Host: accepted, and Host leaves (the leg builds its own).
        for host in [
            "storage.googleapis.com",
            "STORAGE.googleapis.com.",
            "storage.googleapis.com:443",
        ] {
            let mut p = parts(Version::HTTP_11, "/b", &[("host", host)]);
            check_authority(&mut p, &TARGET).unwrap();
            assert!(p.headers.get(header::HOST).is_none(), "{host}");
        }
        // h2: :authority in the URI, with or without an equal host field.
        let mut p = parts(
            Version::HTTP_2,
            "https://storage.googleapis.com/b",
            &[("host", "storage.googleapis.com")],
        );
        check_authority(&mut p, &TARGET).unwrap();
        assert!(p.headers.get(header::HOST).is_none());
        let mut p = parts(Version::HTTP_2, "https://storage.googleapis.com/b", &[]);
        check_authority(&mut p, &TARGET).unwrap();

        // Two Host fields: 400, even when equal.
        let mut p = parts(
            Version::HTTP_11,
            "/b",
            &[
                ("host", "storage.googleapis.com"),
                ("host", "storage.googleapis.com"),
            ],
        );
        let e = check_authority(&mut p, &TARGET).unwrap_err();
        assert_eq!(e.status(), 400);
        // HTTP/1.1 without Host: 400.
        let mut p = parts(Version::HTTP_11, "/b", &[]);
        assert_eq!(check_authority(&mut p, &TARGET).unwrap_err().status(), 400);
        // Another host or port, by Host or by :authority: 421, and it never reaches upstream.
        for (version, uri, host) in [
            (Version::HTTP_11, "/b", Some("evil.example.com")),
            (Version::HTTP_11, "/b", Some("storage.googleapis.com:8443")),
            (Version::HTTP_2, "https://evil.example.com/b", None),
            (
                Version::HTTP_2,
                "https://storage.googleapis.com/b",
                Some("evil.example.com"),
            ),
        ] {
            let h: Vec<(&str, &str)> = host.map(|h| ("host", h)).into_iter().collect();
            let mut p = parts(version, uri, &h);
            let e = check_authority(&mut p, &TARGET).unwrap_err();
            assert_eq!(e.status(), 421, "{uri} {host:?}");
        }
        // Not an authority at all: 400.
        for host in ["storage.googleapis.com:https", ":443", "[::1"] {
            let mut p = parts(Version::HTTP_11, "/b", &[("host", host)]);
            let e = check_authority(&mut p, &TARGET).unwrap_err();
            assert_eq!(e.status(), 400, "{host}");
        }
        // IPv6 literals split at their brackets (the target's host keeps them).
        let v6 = Expected {
            host: "[::1]",
            port: 8443,
            default_port: 443,
            host_ignored: false,
        };
        let mut p = parts(Version::HTTP_11, "/b", &[("host", "[::1]:8443")]);
        check_authority(&mut p, &v6).unwrap();
        let mut p = parts(Version::HTTP_11, "/b", &[("host", "[::1]")]);
        assert_eq!(check_authority(&mut p, &v6).unwrap_err().status(), 421);

        // Absolute-form on the listener: Host is ignored, but two of them are still a 400.
        let plain = Expected {
            host: "storage.googleapis.com",
            port: 80,
            default_port: 80,
            host_ignored: true,
        };
        let mut p = parts(
            Version::HTTP_11,
            "http://storage.googleapis.com/b",
            &[("host", "evil.example.com")],
        );
        check_authority(&mut p, &plain).unwrap();
        assert!(p.headers.get(header::HOST).is_none());
        let mut p = parts(
            Version::HTTP_11,
            "http://storage.googleapis.com/b",
            &[("host", "a"), ("host", "b")],
        );
        assert_eq!(check_authority(&mut p, &plain).unwrap_err().status(), 400);
    }

    /// Found by the `request_target` fuzz target: a CONNECT to an IPv6 literal keeps the
    /// brackets in the target's host (`[::1]`), and a request naming the target as it must
    /// (`[::1]:8443`, or the upstream authority) got 421; `[::1]8443`, not an authority, was
    /// read as port 8443.
    #[test]
    fn an_ipv6_literal_target_is_named_with_its_brackets() {
        let uri: http::Uri = "[::1]:8443".parse().unwrap();
        let (host, port) = super::super::connect::host_port(&uri, None).unwrap();
        let target = super::super::forward::Target::new(host, port, true).unwrap();
        let expected = target.expected();
        for ok in ["[::1]:8443", target.authority().as_str()] {
            names_target(ok, &expected).unwrap();
        }
        for other in ["[::1]", "[::1]:", "[::2]:8443", "::1:8443"] {
            assert_eq!(
                names_target(other, &expected).unwrap_err().status(),
                421,
                "{other}"
            );
        }
        for bad in ["[::1]8443", "[::1]x", "[::1"] {
            assert_eq!(
                names_target(bad, &expected).unwrap_err().status(),
                400,
                "{bad}"
            );
        }
    }

    /// Found by the `request_target` fuzz target: `CONNECT a..:443` is the target `a` (every
    /// trailing dot goes), but a request naming `a..:443` lost one dot only, and got 421.
    #[test]
    fn trailing_dots_go_as_the_targets_did() {
        let uri: http::Uri = "a..:443".parse().unwrap();
        let (host, port) = super::super::connect::host_port(&uri, None).unwrap();
        let target = super::super::forward::Target::new(host, port, true).unwrap();
        for ok in ["a..:443", "a.", "A..."] {
            names_target(ok, &target.expected()).unwrap();
        }
    }

    /// Found by the `request_target` fuzz target: an empty port (`host:`) is the default port
    /// in a request-target, and was a 400 in `Host`.
    #[test]
    fn an_empty_port_is_the_default_one() {
        for ok in ["storage.googleapis.com:", "[::1]:"] {
            let host = ok.trim_end_matches(':');
            let target = super::super::forward::Target::new(host.into(), 443, true).unwrap();
            names_target(ok, &target.expected()).unwrap();
        }
    }

    /// A header map of `(name, value)` rows, appended in order.
    fn fields(rows: &[(&str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (name, value) in rows {
            h.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_static(value),
            );
        }
        h
    }

    #[test]
    fn hop_by_hop_rows_go_and_te_trailers_stays() {
        let mut h = fields(&[
            ("connection", "close, x-custom"),
            ("x-custom", "1"),
            ("keep-alive", "timeout=5"),
            ("proxy-connection", "keep-alive"),
            ("proxy-authorization", "Basic x"),
            ("te", "gzip, trailers"),
            ("upgrade", "h2c"),
            ("transfer-encoding", "chunked"),
            ("content-type", "application/json"),
        ]);
        assert!(strip_hop_by_hop(&mut h), "Transfer-Encoding was there");
        let names: Vec<_> = h.keys().map(|k| k.as_str().to_string()).collect();
        assert_eq!(h.get(header::TE).unwrap(), "trailers");
        assert_eq!(h.len(), 2, "{names:?}");
        assert!(h.contains_key(header::CONTENT_TYPE));
    }

    #[test]
    fn every_connection_line_names_fields_to_drop() {
        // Several lines; names in any case; one naming `Connection` itself, an empty one and
        // one that is no field name, none of which stops the names after it.
        let mut h = fields(&[
            ("connection", "Connection, X-First"),
            ("connection", "not a name, , x-second"),
            ("connection", "keep-alive"),
            ("x-first", "1"),
            ("x-second", "2"),
            ("x-kept", "3"),
        ]);
        strip_hop_by_hop(&mut h);
        assert_eq!(h.keys().collect::<Vec<_>>(), ["x-kept"]);
    }

    #[test]
    fn metadata_flavor_is_never_forwarded() {
        // Alone (the fast path finds it) and beside other fields.
        let mut h = HeaderMap::new();
        h.insert("metadata-flavor", HeaderValue::from_static("Google"));
        strip_hop_by_hop(&mut h);
        assert!(h.is_empty(), "{h:?}");
        let mut h = HeaderMap::new();
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert("Metadata-Flavor", HeaderValue::from_static("Google"));
        h.insert(header::ACCEPT, HeaderValue::from_static("*/*"));
        strip_hop_by_hop(&mut h);
        assert!(!h.contains_key("metadata-flavor"));
        assert_eq!(h.len(), 2);
    }

    #[test]
    fn messages_without_hop_by_hop_fields_keep_every_field() {
        let mut h = HeaderMap::new();
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        h.append("x-many", HeaderValue::from_static("1"));
        h.append("x-many", HeaderValue::from_static("2"));
        assert!(!strip_hop_by_hop(&mut h));
        assert_eq!(h.len(), 4);
        assert_eq!(h.get(header::TE).unwrap(), "trailers");
        assert_eq!(h.get_all("x-many").iter().count(), 2);

        // TE without trailers goes, alone or not.
        let mut h = HeaderMap::new();
        h.insert(header::TE, HeaderValue::from_static("gzip"));
        strip_hop_by_hop(&mut h);
        assert!(h.is_empty());

        // A field named only by Connection goes with it.
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("x-hop"));
        h.insert("x-hop", HeaderValue::from_static("1"));
        h.insert("x-end", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.keys().collect::<Vec<_>>(), ["x-end"]);
    }

    #[test]
    fn cookie_row_joins_for_http1_only() {
        let mut h = HeaderMap::new();
        h.append(header::COOKIE, HeaderValue::from_static("a=1"));
        h.append(header::COOKIE, HeaderValue::from_static("b=2"));
        h.append(header::COOKIE, HeaderValue::from_static("c=3"));
        for_http1(&mut h, None);
        assert_eq!(h.get_all(header::COOKIE).iter().count(), 1);
        assert_eq!(h.get(header::COOKIE).unwrap(), "a=1; b=2; c=3");
        // One cookie field is left alone.
        let mut h = HeaderMap::new();
        h.insert(header::COOKIE, HeaderValue::from_static("a=1; b=2"));
        for_http1(&mut h, None);
        assert_eq!(h.get(header::COOKIE).unwrap(), "a=1; b=2");
    }

    #[test]
    fn upgrade_is_asked_again_on_the_http1_leg_only() {
        let mut h = HeaderMap::new();
        let up = RequestedUpgrade(HeaderValue::from_static("websocket"));
        for_http1(&mut h, Some(&up));
        assert_eq!(h.get(header::UPGRADE).unwrap(), "websocket");
        assert_eq!(h.get(header::CONNECTION).unwrap(), "upgrade");
    }

    #[test]
    fn content_length_row_matches_the_body_or_goes() {
        let with = |v: &[&'static str]| {
            let mut h = HeaderMap::new();
            for x in v {
                h.append(header::CONTENT_LENGTH, HeaderValue::from_static(x));
            }
            h
        };
        let mut h = with(&["5"]);
        match_content_length(&mut h, Some(5));
        assert_eq!(h.get(header::CONTENT_LENGTH).unwrap(), "5");
        for (values, body) in [
            (&["5"][..], None),
            (&["5"][..], Some(6)),
            (&["5", "5"][..], Some(5)),
            (&["x"][..], Some(5)),
        ] {
            let mut h = with(values);
            match_content_length(&mut h, body);
            assert!(
                h.get(header::CONTENT_LENGTH).is_none(),
                "{values:?} {body:?}"
            );
        }
        // A response with Transfer-Encoding loses its Content-Length.
        let mut h = with(&["10"]);
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        response_from_origin(&mut h);
        assert!(h.is_empty());
    }
}
