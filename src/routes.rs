//! The compiled route table. (Stub: owned by the ca+routes work.)

use http::Method;

use crate::config::{Config, ConfigError};

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

#[derive(Debug, Clone)]
pub struct Route {
    pub name: String,
    pub action: Action,
}

#[derive(Debug, Default)]
pub struct RouteTable {
    routes: Vec<Route>,
}

impl RouteTable {
    /// Compile the config's routes. `host` arguments below are lower-case, without port.
    pub fn compile(_config: &Config) -> Result<RouteTable, ConfigError> {
        Ok(RouteTable::default())
    }

    /// Does any route name this host (so CONNECT to it is intercepted)?
    pub fn routes_host(&self, _host: &str) -> bool {
        false
    }

    /// Index of the first route matching host, path (without query) and method.
    pub fn find(&self, _host: &str, _path: &str, _method: &Method) -> Option<usize> {
        None
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
}
