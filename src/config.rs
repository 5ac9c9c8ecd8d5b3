//! The YAML configuration: schema, defaults, cross-field validation and loading.
//!
//! `from_yaml` parses and validates without touching the filesystem, so unit tests feed it
//! inline YAML; `load` adds the file read and names the file in every error. Unknown keys are
//! refused so a typo never silently falls back to a default. Errors never echo the raw YAML.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// The scope used when an identity names none.
pub const CLOUD_PLATFORM_SCOPE: &str = "https://www.googleapis.com/auth/cloud-platform";
/// Google's public IAM Credentials endpoint.
pub const DEFAULT_IAM_ENDPOINT: &str = "https://iamcredentials.googleapis.com";
/// Longest lifetime Google grants, and only with the org-policy extension.
pub const MAX_LIFETIME: Duration = Duration::from_secs(43_200);

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: cannot read: {source}")]
    Read {
        file: String,
        #[source]
        source: std::io::Error,
    },
    /// serde_yaml's message names the key and the line and column.
    #[error("{file}: {message}")]
    Parse { file: String, message: String },
    #[error("{file}: {key}: {message}")]
    Invalid {
        file: String,
        key: String,
        message: String,
    },
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Where clients send CONNECT and absolute-form requests. Loopback by default: a proxy that
    /// hands out credentials must not be reachable from the network unless asked to be.
    pub listen: SocketAddr,
    /// `/healthz`, `/readyz`, `/metrics`; `null` turns it off.
    pub admin: Option<SocketAddr>,
    pub ca: CaConfig,
    /// One-key map (`{ file: creds.json }`), the shape users write.
    #[serde(with = "serde_yaml::with::singleton_map")]
    pub source: SourceConfig,
    pub iam: IamConfig,
    pub identities: BTreeMap<String, IdentityConfig>,
    /// First match wins.
    pub routes: Vec<RouteConfig>,
    /// What to do with CONNECT to a host no route names.
    pub other_hosts: OtherHosts,
    /// What to do with a request to a routed host that no rule's path/method matches.
    pub unmatched: Unmatched,
    /// Ports a client may CONNECT to or forward to; anything else is refused (no open relay).
    pub allowed_ports: Vec<u16>,
    /// What happens to an absolute-form `http://` request whose route gives it a token: a
    /// token never leaves the proxy in cleartext.
    pub plain_http: PlainHttp,
    /// An HTTP(S) proxy for the proxy's own calls to Google's token services (IAM
    /// Credentials, OAuth2, STS). Without it they go direct, whatever `HTTPS_PROXY` says in
    /// the proxy's own environment (which may well point at the proxy itself).
    pub outbound_proxy: Option<String>,
    pub upstream: UpstreamConfig,
    pub limits: LimitsConfig,
    pub tokens: TokensConfig,
    /// What Google's client libraries need to run unchanged through the proxy.
    pub facade: FacadeConfig,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            admin: Some(SocketAddr::from(([127, 0, 0, 1], 9090))),
            ca: CaConfig::default(),
            source: SourceConfig::Adc {},
            iam: IamConfig::default(),
            identities: BTreeMap::new(),
            routes: Vec::new(),
            other_hosts: OtherHosts::Tunnel,
            unmatched: Unmatched::Forward,
            allowed_ports: vec![443, 80],
            plain_http: PlainHttp::Upgrade,
            outbound_proxy: None,
            upstream: UpstreamConfig::default(),
            limits: LimitsConfig::default(),
            tokens: TokensConfig::default(),
            facade: FacadeConfig::default(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CaConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// How many minted leaf configurations are kept; one per SNI name.
    pub leaf_cache: usize,
    /// Validity of minted leaf certificates; they are re-minted before they lapse.
    #[serde(deserialize_with = "de_duration")]
    pub leaf_lifetime: Duration,
}

impl Default for CaConfig {
    fn default() -> Self {
        CaConfig {
            cert: PathBuf::from("certs/ca.pem"),
            key: PathBuf::from("certs/ca-key.pem"),
            leaf_cache: 1024,
            leaf_lifetime: Duration::from_secs(24 * 3600),
        }
    }
}

/// Credential A: what the proxy itself authenticates as.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum SourceConfig {
    /// Application Default Credentials: `GOOGLE_APPLICATION_CREDENTIALS`, the gcloud well-known
    /// file, then the metadata server.
    Adc {},
    /// A credentials JSON file of any ADC type (`service_account`, `authorized_user`,
    /// `impersonated_service_account`, `external_account`).
    File(PathBuf),
    /// The metadata server; `host` overrides `GCE_METADATA_HOST` and the default.
    Metadata {
        #[serde(default)]
        host: Option<String>,
    },
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IamConfig {
    /// Base URL of the IAM Credentials API (the emulator, or a private endpoint).
    pub endpoint: String,
    /// Per-call timeout for minting.
    #[serde(deserialize_with = "de_duration")]
    pub timeout: Duration,
}

impl Default for IamConfig {
    fn default() -> Self {
        IamConfig {
            endpoint: DEFAULT_IAM_ENDPOINT.to_string(),
            timeout: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityConfig {
    pub service_account: String,
    /// Emails or `projects/-/serviceAccounts/EMAIL`; normalised to the latter.
    #[serde(default)]
    pub delegates: Vec<String>,
    #[serde(default = "default_scopes")]
    pub scopes: Vec<String>,
    #[serde(default = "default_lifetime", deserialize_with = "de_duration")]
    pub lifetime: Duration,
    /// Sent as `x-goog-user-project` on requests made as this identity.
    #[serde(default)]
    pub quota_project: Option<String>,
}

fn default_scopes() -> Vec<String> {
    vec![CLOUD_PLATFORM_SCOPE.to_string()]
}

fn default_lifetime() -> Duration {
    Duration::from_secs(3600)
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// Shown in logs, errors and `check`; defaults to `route-N` (1-based).
    #[serde(default)]
    pub name: Option<String>,
    /// `storage.googleapis.com` or `*.googleapis.com` (subdomains only).
    pub host: String,
    /// A prefix (`/storage/v1/`) or, with `*`, a glob over the whole path.
    #[serde(default)]
    pub path: Option<String>,
    /// Empty means every method.
    #[serde(default)]
    pub methods: Vec<String>,
    /// Inject an access token for this identity.
    #[serde(default)]
    pub identity: Option<String>,
    /// Inject an ID token instead.
    #[serde(default)]
    pub id_token: Option<IdTokenRoute>,
    /// Forward as-is without touching `Authorization` (e.g. public buckets).
    #[serde(default)]
    pub passthrough: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdTokenRoute {
    pub identity: String,
    pub audience: String,
    #[serde(default = "default_true")]
    pub include_email: bool,
}

fn default_true() -> bool {
    true
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OtherHosts {
    Tunnel,
    Deny,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Unmatched {
    /// Forward without touching `Authorization`.
    Forward,
    /// Answer 403.
    Deny,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PlainHttp {
    /// Send it upstream over TLS to the host's port 443, the host name verified.
    Upgrade,
    /// Answer 403, naming the route.
    Deny,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UpstreamConfig {
    /// `host:port` → address, like curl's `--resolve`: TLS still verifies `host`.
    pub resolve: BTreeMap<String, SocketAddr>,
    /// Extra PEM roots trusted for upstream TLS, added to the system roots.
    pub extra_roots: Vec<PathBuf>,
    /// Trust the system roots (turn off to trust only `extra_roots`).
    pub system_roots: bool,
    #[serde(deserialize_with = "de_duration")]
    pub connect_timeout: Duration,
    /// Time allowed for the origin's response headers.
    #[serde(deserialize_with = "de_duration")]
    pub response_timeout: Duration,
    /// An upstream connection that carries no new request for this long is closed (streams
    /// still open on an h2 connection run to their end).
    #[serde(deserialize_with = "de_duration")]
    pub idle_timeout: Duration,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        UpstreamConfig {
            resolve: BTreeMap::new(),
            extra_roots: Vec::new(),
            system_roots: true,
            connect_timeout: Duration::from_secs(10),
            response_timeout: Duration::from_secs(300),
            idle_timeout: Duration::from_secs(90),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    pub max_connections: usize,
    /// Time a client has to send a complete request head.
    #[serde(deserialize_with = "de_duration")]
    pub header_read_timeout: Duration,
    /// A client connection with no request in flight is closed after this.
    #[serde(deserialize_with = "de_duration")]
    pub idle_timeout: Duration,
    pub max_header_bytes: usize,
    /// Time allowed to finish in-flight requests on shutdown.
    #[serde(deserialize_with = "de_duration")]
    pub drain_timeout: Duration,
    /// Proxy worker threads; 0 means one per core. Each worker accepts its own connections and
    /// keeps its own upstream pool, so a request never hops between threads.
    pub workers: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_connections: 10_000,
            header_read_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(120),
            max_header_bytes: 64 * 1024,
            drain_timeout: Duration::from_secs(30),
            workers: 0,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TokensConfig {
    /// Renew this long before expiry; default 5 min, or a quarter of the lifetime when that is
    /// shorter.
    #[serde(deserialize_with = "de_opt_duration")]
    pub refresh_margin: Option<Duration>,
    /// Up to this much random extra margin, so identities do not refresh in one burst.
    #[serde(deserialize_with = "de_duration")]
    pub jitter: Duration,
    /// A token with less than this left is never served.
    #[serde(deserialize_with = "de_duration")]
    pub safety_window: Duration,
    /// Mint every configured identity's tokens at start-up.
    pub warm: bool,
}

impl Default for TokensConfig {
    fn default() -> Self {
        TokensConfig {
            refresh_margin: None,
            jitter: Duration::from_secs(30),
            safety_window: Duration::from_secs(60),
            warm: true,
        }
    }
}

/// Google's client libraries look for a credential before their first request (a key file,
/// gcloud's file, then the metadata server) and stop if there is none. The facade gives them
/// one; the proxy then puts the route's real token on the wire.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FacadeConfig {
    /// A GCE metadata-server facade for `GCE_METADATA_HOST`; off unless configured.
    pub metadata: Option<MetadataFacadeConfig>,
    /// Answer `POST https://oauth2.googleapis.com/token` (and the older
    /// `www.googleapis.com/oauth2/v4/token`) through the proxy with a placeholder token, so a
    /// client holding a placeholder key or `authorized_user` file never sends its credential
    /// to Google.
    pub token_endpoint: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetadataFacadeConfig {
    /// Loopback by default: it hands out tokens to whoever asks.
    #[serde(default = "default_metadata_listen")]
    pub listen: SocketAddr,
    /// The configured identity behind `service-accounts/default`.
    pub identity: String,
    /// `project/project-id`; clients use it as their default project.
    pub project_id: String,
    /// `project/numeric-project-id`.
    #[serde(default = "default_numeric_project_id")]
    pub numeric_project_id: String,
    /// `placeholder`: tokens the proxy replaces on the wire (the default); `real`: the
    /// identity's real tokens, for clients that also call hosts no route names.
    #[serde(default)]
    pub tokens: FacadeTokens,
}

fn default_metadata_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8181))
}

fn default_numeric_project_id() -> String {
    "0".into()
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FacadeTokens {
    #[default]
    Placeholder,
    Real,
}

impl Config {
    /// Parse and validate; `file` only names the source in errors.
    pub fn from_yaml(yaml: &str, file: &str) -> Result<Config, ConfigError> {
        let config: Config = serde_yaml::from_str(yaml).map_err(|e| ConfigError::Parse {
            file: file.to_string(),
            message: scrub_yaml_error(&e),
        })?;
        config.validate(file)?;
        Ok(config)
    }

    /// Read, parse and validate a config file. Relative CA paths stay relative to the working
    /// directory, as a user typing them expects.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            file: file.clone(),
            source,
        })?;
        Config::from_yaml(&text, &file)
    }

    /// Cross-field rules that serde cannot express.
    pub fn validate(&self, file: &str) -> Result<(), ConfigError> {
        let invalid = |key: String, message: String| ConfigError::Invalid {
            file: file.to_string(),
            key,
            message,
        };
        for (name, id) in &self.identities {
            let key = |k: &str| format!("identities.{name}.{k}");
            if !is_service_account_email(&id.service_account) {
                return Err(invalid(
                    key("service_account"),
                    format!(
                        "`{}` is not a service account email (NAME@PROJECT.iam.gserviceaccount.com)",
                        id.service_account
                    ),
                ));
            }
            for (i, d) in id.delegates.iter().enumerate() {
                let email = d.strip_prefix("projects/-/serviceAccounts/").unwrap_or(d);
                if !is_service_account_email(email) {
                    return Err(invalid(
                        format!("identities.{name}.delegates[{i}]"),
                        format!("`{d}` is not a service account email"),
                    ));
                }
            }
            if id.scopes.is_empty() {
                return Err(invalid(
                    key("scopes"),
                    "at least one scope is required".into(),
                ));
            }
            if id.lifetime.is_zero() || id.lifetime > MAX_LIFETIME {
                return Err(invalid(
                    key("lifetime"),
                    format!(
                        "{}s is outside 1s..=43200s (over 3600s needs the org-policy extension)",
                        id.lifetime.as_secs()
                    ),
                ));
            }
        }
        for (i, r) in self.routes.iter().enumerate() {
            let key = |k: &str| format!("routes[{i}].{k}");
            let kinds = [r.identity.is_some(), r.id_token.is_some(), r.passthrough];
            if kinds.iter().filter(|k| **k).count() != 1 {
                return Err(invalid(
                    key("identity"),
                    "a route needs exactly one of `identity`, `id_token` or `passthrough: true`"
                        .into(),
                ));
            }
            let named = r
                .identity
                .as_deref()
                .or(r.id_token.as_ref().map(|t| t.identity.as_str()));
            if let Some(n) = named {
                if !self.identities.contains_key(n) {
                    return Err(invalid(
                        key("identity"),
                        format!("unknown identity `{n}` (not under `identities`)"),
                    ));
                }
            }
            if let Some(t) = &r.id_token {
                if t.audience.is_empty() {
                    return Err(invalid(
                        key("id_token.audience"),
                        "must not be empty".into(),
                    ));
                }
            }
        }
        if self.allowed_ports.is_empty() {
            return Err(invalid(
                "allowed_ports".into(),
                "at least one port is required".into(),
            ));
        }
        if self.limits.max_connections == 0 {
            return Err(invalid(
                "limits.max_connections".into(),
                "must be at least 1".into(),
            ));
        }
        if self.limits.workers > 1024 {
            return Err(invalid(
                "limits.workers".into(),
                "at most 1024 (0 means one per core)".into(),
            ));
        }
        if self.ca.leaf_cache == 0 {
            return Err(invalid("ca.leaf_cache".into(), "must be at least 1".into()));
        }
        url::Url::parse(&self.iam.endpoint)
            .map_err(|e| invalid("iam.endpoint".into(), format!("not a URL: {e}")))?;
        if let Some(proxy) = &self.outbound_proxy {
            // Not echoed: a proxy URL may carry a password.
            let ok = url::Url::parse(proxy)
                .is_ok_and(|u| matches!(u.scheme(), "http" | "https") && u.has_host());
            if !ok {
                return Err(invalid(
                    "outbound_proxy".into(),
                    "expected an http:// or https:// proxy URL".into(),
                ));
            }
        }
        if let Some(m) = &self.facade.metadata {
            if !self.identities.contains_key(&m.identity) {
                return Err(invalid(
                    "facade.metadata.identity".into(),
                    format!("unknown identity `{}` (not under `identities`)", m.identity),
                ));
            }
            if m.project_id.is_empty() {
                return Err(invalid(
                    "facade.metadata.project_id".into(),
                    "must not be empty".into(),
                ));
            }
            if m.numeric_project_id.is_empty()
                || !m.numeric_project_id.bytes().all(|b| b.is_ascii_digit())
            {
                return Err(invalid(
                    "facade.metadata.numeric_project_id".into(),
                    "digits only".into(),
                ));
            }
            if !m.listen.ip().is_loopback() && m.tokens == FacadeTokens::Real {
                return Err(invalid(
                    "facade.metadata.listen".into(),
                    "with `tokens: real` the facade hands real tokens to whoever asks: it listens on loopback only".into(),
                ));
            }
        }
        for key in self.upstream.resolve.keys() {
            if split_host_port(key).is_none() {
                return Err(invalid(
                    format!("upstream.resolve.{key}"),
                    "keys are `host:port`, like curl's --resolve".into(),
                ));
            }
        }
        // Host, path and method patterns are checked by compiling the table once here, so a bad
        // pattern is a start-up error that names this file.
        crate::routes::RouteTable::compile(self).map_err(|e| match e {
            ConfigError::Invalid { key, message, .. } => invalid(key, message),
            other => other,
        })?;
        Ok(())
    }

    /// The route's display name: its `name`, or `route-N`.
    pub fn route_name(&self, index: usize) -> String {
        self.routes
            .get(index)
            .and_then(|r| r.name.clone())
            .unwrap_or_else(|| format!("route-{}", index + 1))
    }
}

/// `host:port` (the host lower-cased, without a trailing dot, IPv6 literals in brackets), as
/// `upstream.resolve` keys are written.
pub fn split_host_port(s: &str) -> Option<(String, u16)> {
    let (host, port) = s.rsplit_once(':')?;
    let port: u16 = port.parse().ok()?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let host = host.strip_suffix('.').unwrap_or(host);
    if host.is_empty() || port == 0 {
        return None;
    }
    Some((host.to_ascii_lowercase(), port))
}

/// `NAME@PROJECT.iam.gserviceaccount.com`, or any `x@y.z` (default compute accounts and
/// test domains); what matters is that it is an email and not a key or a token.
pub fn is_service_account_email(s: &str) -> bool {
    match s.split_once('@') {
        Some((local, domain)) => {
            !local.is_empty()
                && domain.contains('.')
                && !domain.starts_with('.')
                && !domain.ends_with('.')
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "@.-_+".contains(c))
        }
        None => false,
    }
}

/// serde_yaml quotes offending scalars in "invalid type/value" messages; those may be secrets
/// typed into the wrong key, so the quoted part is dropped and only the location and the
/// expectation are kept.
fn scrub_yaml_error(e: &serde_yaml::Error) -> String {
    let msg = e.to_string();
    match (
        msg.find("invalid type: string \""),
        msg.find("invalid value: string \""),
    ) {
        (Some(start), _) | (None, Some(start)) => {
            // `invalid type: string "…", expected X at line L column C`
            let head = &msg[..start];
            let tail = msg[start..]
                .find("\", expected")
                .map(|i| &msg[start + i + 2..])
                .unwrap_or("");
            format!("{head}invalid string{tail}")
        }
        _ => msg,
    }
}

/// Parse `90s`, `5m`, `1h`, `1h30m`, `250ms`, or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if s.is_empty() {
        return Err("empty duration".into());
    }
    if let Ok(secs) = s.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    let mut total = Duration::ZERO;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .ok_or_else(|| format!("`{s}`: missing unit (ms, s, m, h)"))?;
        if digits == 0 {
            return Err(format!("`{s}`: expected a number"));
        }
        let n: u64 = rest[..digits]
            .parse()
            .map_err(|_| format!("`{s}`: number too large"))?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let part = match &rest[..unit_len] {
            "ms" => Duration::from_millis(n),
            "s" => Duration::from_secs(n),
            "m" => Duration::from_secs(n.saturating_mul(60)),
            "h" => Duration::from_secs(n.saturating_mul(3600)),
            u => return Err(format!("`{s}`: unknown unit `{u}` (use ms, s, m, h)")),
        };
        total = total.saturating_add(part);
        rest = &rest[unit_len..];
    }
    Ok(total)
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawDuration {
    Secs(u64),
    Text(String),
}

fn de_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    match RawDuration::deserialize(d)? {
        RawDuration::Secs(s) => Ok(Duration::from_secs(s)),
        RawDuration::Text(t) => parse_duration(&t).map_err(serde::de::Error::custom),
    }
}

fn de_opt_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    match Option::<RawDuration>::deserialize(d)? {
        None => Ok(None),
        Some(RawDuration::Secs(s)) => Ok(Some(Duration::from_secs(s))),
        Some(RawDuration::Text(t)) => parse_duration(&t)
            .map(Some)
            .map_err(serde::de::Error::custom),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
listen: 127.0.0.1:18080
source: { file: creds.json }
identities:
  reader:
    service_account: reader@proj.iam.gserviceaccount.com
    delegates: [hop@proj.iam.gserviceaccount.com]
    lifetime: 30m
  dev:
    service_account: dev@proj.iam.gserviceaccount.com
routes:
  - { host: storage.googleapis.com, path: "/storage/v1/b/prod-*", methods: [GET], identity: reader }
  - { host: "*.googleapis.com", identity: dev }
  - { host: "*.run.app", id_token: { identity: dev, audience: "https://svc.a.run.app" } }
other_hosts: deny
"#;

    #[test]
    fn parses_a_full_config_with_defaults() {
        let c = Config::from_yaml(GOOD, "t.yaml").unwrap();
        assert_eq!(c.listen.port(), 18080);
        assert_eq!(c.identities["reader"].lifetime, Duration::from_secs(1800));
        assert_eq!(c.identities["dev"].scopes, vec![CLOUD_PLATFORM_SCOPE]);
        assert_eq!(c.identities["dev"].lifetime, Duration::from_secs(3600));
        assert_eq!(c.other_hosts, OtherHosts::Deny);
        assert_eq!(c.unmatched, Unmatched::Forward);
        assert_eq!(c.routes.len(), 3);
        assert!(matches!(c.source, SourceConfig::File(ref p) if p == Path::new("creds.json")));
        assert_eq!(c.route_name(1), "route-2");
        assert_eq!(c.allowed_ports, vec![443, 80]);
        assert_eq!(c.plain_http, PlainHttp::Upgrade);
        assert!(c.outbound_proxy.is_none());
    }

    #[test]
    fn the_facade_names_a_known_identity_and_real_tokens_stay_on_loopback() {
        let with = |extra: &str| Config::from_yaml(&format!("{GOOD}{extra}"), "t.yaml");
        let c =
            with("facade: { token_endpoint: true, metadata: { identity: dev, project_id: p } }\n")
                .unwrap();
        let m = c.facade.metadata.unwrap();
        assert_eq!(m.listen.to_string(), "127.0.0.1:8181");
        assert_eq!(m.tokens, FacadeTokens::Placeholder);
        assert!(c.facade.token_endpoint);
        let e = with("facade: { metadata: { identity: nobody, project_id: p } }\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("facade.metadata.identity"), "{e}");
        let e = with(
            "facade: { metadata: { identity: dev, project_id: p, numeric_project_id: \"12a\" } }\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("numeric_project_id"), "{e}");
        let e = with("facade: { metadata: { identity: dev, project_id: p, tokens: real, listen: 0.0.0.0:8181 } }\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("facade.metadata.listen"), "{e}");
    }

    #[test]
    fn resolve_keys_need_a_port_and_the_outbound_proxy_a_url() {
        let with = |extra: &str| Config::from_yaml(&format!("{GOOD}{extra}"), "t.yaml");
        let c = with(
            "upstream: { resolve: { \"Storage.googleapis.com:443\": 127.0.0.1:1, \"storage.googleapis.com:80\": 127.0.0.1:2 } }\nplain_http: deny\n",
        )
        .unwrap();
        assert_eq!(c.upstream.resolve.len(), 2);
        assert_eq!(c.plain_http, PlainHttp::Deny);
        let e = with("upstream: { resolve: { storage.googleapis.com: 127.0.0.1:1 } }\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("upstream.resolve.storage.googleapis.com"), "{e}");
        let e = with("outbound_proxy: \"socks5://user:hunter2@corp:1080\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("outbound_proxy") && !e.contains("hunter2"),
            "{e}"
        );
        assert!(with("outbound_proxy: http://corp:3128\n").is_ok());
        assert_eq!(split_host_port("[::1]:443"), Some(("::1".to_string(), 443)));
        assert_eq!(
            split_host_port("Host.Example.:8443"),
            Some(("host.example".to_string(), 8443))
        );
        assert_eq!(split_host_port("host"), None);
        assert_eq!(split_host_port("host:0"), None);
    }

    #[test]
    fn empty_document_is_the_default() {
        let c = Config::from_yaml("{}", "t.yaml").unwrap();
        assert_eq!(c.listen, SocketAddr::from(([127, 0, 0, 1], 8080)));
        assert!(matches!(c.source, SourceConfig::Adc {}));
    }

    #[test]
    fn unknown_key_is_refused_with_its_name_and_line() {
        let err = Config::from_yaml("listen: 127.0.0.1:1\nlisten_addr: x\n", "c.yaml")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("c.yaml: "), "{err}");
        assert!(err.contains("listen_addr"), "{err}");
        assert!(err.contains("line 2"), "{err}");
    }

    #[test]
    fn route_to_unknown_identity_is_refused() {
        let y = "routes:\n  - { host: a.googleapis.com, identity: ghost }\n";
        let err = Config::from_yaml(y, "c.yaml").unwrap_err().to_string();
        assert!(err.contains("routes[0].identity"), "{err}");
        assert!(err.contains("ghost"), "{err}");
    }

    #[test]
    fn lifetime_over_twelve_hours_is_refused() {
        let y =
            "identities:\n  a: { service_account: a@p.iam.gserviceaccount.com, lifetime: 13h }\n";
        let err = Config::from_yaml(y, "c.yaml").unwrap_err().to_string();
        assert!(err.contains("identities.a.lifetime"), "{err}");
    }

    #[test]
    fn bad_email_and_empty_scopes_are_refused() {
        let y = "identities:\n  a: { service_account: not-an-email }\n";
        assert!(Config::from_yaml(y, "c")
            .unwrap_err()
            .to_string()
            .contains("identities.a.service_account"));
        let y = "identities:\n  a: { service_account: a@p.iam.gserviceaccount.com, scopes: [] }\n";
        assert!(Config::from_yaml(y, "c")
            .unwrap_err()
            .to_string()
            .contains("identities.a.scopes"));
    }

    #[test]
    fn workers_default_to_one_per_core_and_are_bounded() {
        let c = Config::from_yaml("{}", "t.yaml").unwrap();
        assert_eq!(c.limits.workers, 0);
        let c = Config::from_yaml("limits: { workers: 3 }\n", "t.yaml").unwrap();
        assert_eq!(c.limits.workers, 3);
        let err = Config::from_yaml("limits: { workers: 5000 }\n", "c.yaml")
            .unwrap_err()
            .to_string();
        assert!(err.contains("limits.workers"), "{err}");
    }

    #[test]
    fn route_needs_exactly_one_action() {
        let y = "identities:\n  a: { service_account: a@p.iam.gserviceaccount.com }\nroutes:\n  - { host: x.googleapis.com }\n";
        assert!(Config::from_yaml(y, "c").is_err());
        let y = "identities:\n  a: { service_account: a@p.iam.gserviceaccount.com }\nroutes:\n  - { host: x.googleapis.com, identity: a, passthrough: true }\n";
        assert!(Config::from_yaml(y, "c").is_err());
    }

    #[test]
    fn wrong_typed_secret_is_not_echoed() {
        let y = "listen: ya29.SECRET-TOKEN-VALUE\n";
        let err = Config::from_yaml(y, "c.yaml").unwrap_err().to_string();
        assert!(!err.contains("SECRET"), "{err}");
        assert!(err.contains("listen"), "{err}");
    }

    #[test]
    fn the_shipped_example_config_is_valid() {
        let c = Config::from_yaml(include_str!("../config.yaml"), "config.yaml").unwrap();
        assert_eq!(c.identities.len(), 3);
        assert_eq!(c.routes.len(), 3);
        assert_eq!(c.identities["reader"].delegates.len(), 1);
        assert_eq!(
            c.identities["jobs"].quota_project.as_deref(),
            Some("my-project")
        );
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("1h30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("h").is_err());
        assert!(parse_duration("10").is_ok());
        assert!(parse_duration("10x").is_err());
    }
}
