//! The request-target of a CONNECT (`host:port`) or absolute-form (`http://host/path`) request
//! as the listener reads it, and the `Host` field checked against the connection's target; the
//! CIDR and `host:port` parsers of `upstream.allow_internal` and `upstream.resolve` on the same
//! text. Input: the request-target, then optionally a newline and a `Host` field value.
#![no_main]

use impersonate_proxy::config::split_host_port;
use impersonate_proxy::fuzzing::{Cidr, ConnectionTarget};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (line, host_field) = match data.iter().position(|&b| b == b'\n') {
        Some(i) => (&data[..i], Some(&data[i + 1..])),
        None => (data, None),
    };
    if let Ok(text) = std::str::from_utf8(line) {
        addresses(text);
    }
    let Ok(uri) = http::Uri::try_from(line) else {
        return;
    };
    let Ok(t) = ConnectionTarget::from_uri(&uri) else {
        return;
    };
    let host = t.host();
    assert!(!host.is_empty() && !host.ends_with('.'), "{uri}");
    assert_eq!(host, host.to_ascii_lowercase(), "{uri}");

    // Whatever names the target the way a client would is accepted: the upstream authority,
    // `host:port` in any case, the request-target's own authority.
    let accepted = |a: &str| {
        assert_eq!(t.accepts_authority(a), Ok(()), "{uri}: {a} refused");
    };
    accepted(t.upstream_authority());
    let host_port = format!("{host}:{}", t.port());
    accepted(&host_port);
    accepted(&host_port.to_ascii_uppercase());
    if let Some(a) = uri.authority() {
        // Userinfo is not part of a `Host` field (RFC 9110 §7.2).
        if !a.as_str().contains('@') {
            accepted(a.as_str());
        }
    }
    // Another port never is.
    let other = t.port().checked_add(1).unwrap_or(1);
    assert_eq!(
        t.accepts_authority(&format!("{host}:{other}")),
        Err(421),
        "{uri}"
    );

    if let Some(v) = host_field {
        let verdict = t.check_host_fields(&[v]);
        assert_eq!(t.check_host_fields(&[v, v]), Err(400), "two Host fields");
        // A CONNECT target (the Host field is checked): what is accepted is an authority that
        // names this host and port.
        if verdict.is_ok() && uri.scheme().is_none() {
            let a = http::uri::Authority::try_from(v)
                .unwrap_or_else(|e| panic!("{uri}: accepted Host {v:?}, not an authority: {e}"));
            let named = a.host().trim_end_matches('.').to_ascii_lowercase();
            assert_eq!(named, host, "{uri}: Host {v:?}");
            assert_eq!(a.port_u16().unwrap_or(443), t.port(), "{uri}: Host {v:?}");
        }
    }
});

fn addresses(text: &str) {
    if let Some(c) = Cidr::parse(text) {
        // A network contains the address it was written with.
        let addr = text.trim().split('/').next().unwrap_or_default();
        let addr = addr.trim().trim_start_matches('[').trim_end_matches(']');
        if let Ok(ip) = addr.parse() {
            assert!(c.contains(ip), "{text}");
        }
    }
    if let Some((host, port)) = split_host_port(text) {
        assert!(port != 0 && !host.is_empty(), "{text}");
        assert_eq!(host, host.to_ascii_lowercase(), "{text}");
    }
}
