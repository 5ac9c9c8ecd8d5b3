//! Entry points for the fuzz targets under `fuzz/` (cargo-fuzz): the smallest public doors to
//! parsers that are private to their modules, so that the targets run the code the proxy runs
//! rather than a copy of it. Not an API: hidden from the documentation, and free to change with
//! the targets.

use http::request;

use crate::proxy::error::ProxyError;
use crate::proxy::forward::Target;
use crate::proxy::{connect, headers};

pub use crate::proxy::destination::Cidr;

/// A connection's target as the listener takes it from a request-target: a CONNECT's
/// `host:port`, or an absolute-form `http://` URI's authority (port 80 by default). The port
/// policy (`allowed_ports`) aside, this is `connect.rs`'s reading.
pub struct ConnectionTarget {
    target: Target,
}

impl ConnectionTarget {
    /// `Err` is the status the client gets (400).
    pub fn from_uri(uri: &http::Uri) -> Result<ConnectionTarget, u16> {
        let tls = uri.scheme().is_none();
        let default_port = if tls { None } else { Some(80) };
        let (host, port) = connect::host_port(uri, default_port).map_err(status)?;
        let target = Target::new(host, port, tls).map_err(status)?;
        Ok(ConnectionTarget { target })
    }

    /// Lower-case, without a trailing dot.
    pub fn host(&self) -> &str {
        &self.target.host
    }

    pub fn port(&self) -> u16 {
        self.target.port
    }

    /// The authority the upstream leg sends.
    pub fn upstream_authority(&self) -> &str {
        self.target.authority().as_str()
    }

    /// Whether a request on this connection may name `authority` (its `Host` or
    /// `:authority`); `Err` is the status of the refusal (400 malformed, 421 another target).
    pub fn accepts_authority(&self, authority: &str) -> Result<(), u16> {
        headers::names_target(authority, &self.target.expected()).map_err(status)
    }

    /// The header check of an HTTP/1.1 request on this connection carrying these `Host`
    /// field values.
    pub fn check_host_fields(&self, values: &[&[u8]]) -> Result<(), u16> {
        let mut builder = request::Builder::new().uri("/");
        for v in values {
            builder = builder.header(http::header::HOST, *v);
        }
        let Ok(req) = builder.body(()) else {
            // Not a field value at all: hyper would have refused the request head.
            return Err(400);
        };
        let (mut parts, ()) = req.into_parts();
        headers::check_authority(&mut parts, &self.target.expected()).map_err(status)
    }
}

fn status(e: ProxyError) -> u16 {
    e.status().as_u16()
}

/// The `exp` claim of an ID token as the token cache reads it (`tokens/iam.rs`).
pub fn jwt_exp(token: &str) -> Option<u64> {
    crate::tokens::iam::jwt_exp(token)
}
