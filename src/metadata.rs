//! The GCE metadata-server protocol, once: the paths, headers and bodies that Google's client
//! libraries probe and read. The emulator serves it with Google's side behind it; the proxy's
//! metadata facade can serve it with placeholders or real tokens. What differs between them
//! sits behind [`Instance`].
//!
//! What the protocol is, from Google's docs ("About VM metadata", "Verify the identity of
//! instances") and from the client libraries that read it:
//! - every answer carries `Metadata-Flavor: Google`, errors included; Node's gcp-metadata
//!   refuses an answer without it ("incorrect Metadata-Flavor header") and google-auth's
//!   `ping` requires it on the 200 from the root;
//! - a request without `Metadata-Flavor: Google`, or with `X-Forwarded-For`, gets 403;
//! - a directory (`instance/`, `…/service-accounts/default/`) lists its entries one per line,
//!   a sub-directory with a trailing `/`; with `?recursive=true` it is one JSON object with
//!   camelCase keys (google-auth reads `…/default/?recursive=true` for `email` and `scopes`);
//! - `token` is `{"access_token","expires_in","token_type":"Bearer"}`, `?scopes=a,b` narrows
//!   it; `identity?audience=A&format=full` is a bare JWT; leaves are `application/text`.

use std::future::Future;
use std::pin::Pin;

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Method, Response, StatusCode, Uri};
use http_body_util::Full;
use serde_json::{json, Value};

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The root every path below lives under.
pub const ROOT: &str = "/computeMetadata/v1/";

/// The instance's service account, as `instance/service-accounts/default/` describes it.
#[derive(Debug, Clone)]
pub struct Account {
    pub email: String,
    /// The instance's access scopes (what a token gets without `?scopes=`).
    pub scopes: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct AccessToken {
    pub access_token: String,
    pub expires_in: u64,
}

/// `identity?format=`: `standard` (the default) or `full` (adds `email` and the
/// `google.compute_engine` claims).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdTokenFormat {
    Standard,
    Full,
}

/// Why a token could not be had.
#[derive(Debug, thiserror::Error)]
pub enum MetadataError {
    /// Answered 404 (e.g. no such account).
    #[error("not found")]
    NotFound,
    /// Answered 503: the token source is failing (the client retries).
    #[error("{0}")]
    Unavailable(String),
}

/// The instance a metadata server describes: who it runs as and how its tokens are made.
pub trait Instance: Send + Sync {
    fn project_id(&self) -> String;
    /// Digits, e.g. `123456789012`.
    fn numeric_project_id(&self) -> String;
    /// The default service account, or None for an instance without one (every
    /// `service-accounts/…` path is then 404).
    fn service_account(&self) -> Option<Account>;
    /// An access token for the default account; `scopes` is `?scopes=` split on commas.
    fn access_token(
        &self,
        scopes: Option<Vec<String>>,
    ) -> BoxFuture<'_, Result<AccessToken, MetadataError>>;
    /// An ID token for the default account.
    fn id_token<'a>(
        &'a self,
        audience: &'a str,
        format: IdTokenFormat,
    ) -> BoxFuture<'a, Result<String, MetadataError>>;
}

type Resp = Response<Full<Bytes>>;

/// Does this path belong to the metadata server (`/` or under `/computeMetadata/`)?
pub fn is_metadata_path(path: &str) -> bool {
    path == "/" || path == "/computeMetadata" || path.starts_with("/computeMetadata/")
}

/// Answer one metadata request.
pub async fn serve<I: Instance + ?Sized>(
    instance: &I,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
) -> Resp {
    let flavor_ok = headers
        .get("metadata-flavor")
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"Google"));
    if !flavor_ok {
        return text(
            StatusCode::FORBIDDEN,
            "Missing required header \"Metadata-Flavor\": \"Google\"\n",
        );
    }
    if headers.contains_key("x-forwarded-for") {
        return text(StatusCode::FORBIDDEN, "Forbidden: X-Forwarded-For\n");
    }
    if method != Method::GET && method != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "Method Not Allowed\n");
    }
    let query: Vec<(String, String)> =
        url::form_urlencoded::parse(uri.query().unwrap_or("").as_bytes())
            .into_owned()
            .collect();
    let param = |k: &str| {
        query
            .iter()
            .find(|(name, _)| name == k)
            .map(|(_, v)| v.as_str())
    };
    let recursive = param("recursive").is_some_and(|v| v.eq_ignore_ascii_case("true"));
    let path = uri.path();
    if path == "/" {
        return listing(&["computeMetadata/"]);
    }
    let Some(rest) = path
        .strip_prefix("/computeMetadata/v1")
        .map(|r| r.trim_start_matches('/'))
    else {
        return not_found();
    };
    // A directory answers with or without its trailing slash.
    let key = rest.trim_end_matches('/');
    let parts: Vec<&str> = if key.is_empty() {
        Vec::new()
    } else {
        key.split('/').collect()
    };
    match parts.as_slice() {
        [] if recursive => json_body(&json!({
            "instance": instance_json(instance),
            "project": project_json(instance),
        })),
        [] => listing(&["instance/", "project/"]),
        ["project"] if recursive => json_body(&project_json(instance)),
        ["project"] => listing(&["numeric-project-id", "project-id"]),
        ["project", "project-id"] => leaf(&instance.project_id()),
        ["project", "numeric-project-id"] => leaf(&instance.numeric_project_id()),
        ["universe", "universe-domain"] => leaf("googleapis.com"),
        ["instance"] if recursive => json_body(&instance_json(instance)),
        ["instance"] => listing(&["hostname", "id", "name", "service-accounts/", "zone"]),
        ["instance", "id"] => leaf(&instance_id(instance)),
        ["instance", "name"] => leaf("emulated-instance"),
        ["instance", "hostname"] => leaf(&format!(
            "emulated-instance.us-central1-a.c.{}.internal",
            instance.project_id()
        )),
        ["instance", "zone"] => leaf(&zone(instance)),
        ["instance", "service-accounts", rest @ ..] => {
            service_accounts(instance, rest, recursive, &param).await
        }
        _ => not_found(),
    }
}

async fn service_accounts<'q, I: Instance + ?Sized>(
    instance: &I,
    rest: &[&str],
    recursive: bool,
    param: &impl Fn(&str) -> Option<&'q str>,
) -> Resp {
    let Some(account) = instance.service_account() else {
        return not_found();
    };
    let (name, leaf_name) = match rest {
        [] if recursive => {
            let one = account_json(&account);
            return json_body(&json!({"default": one, account.email.clone(): one}));
        }
        [] => return listing(&["default/", &format!("{}/", account.email)]),
        [name] => (*name, None),
        [name, leaf_name] => (*name, Some(*leaf_name)),
        _ => return not_found(),
    };
    if name != "default" && !name.eq_ignore_ascii_case(&account.email) {
        return not_found();
    }
    match leaf_name {
        None if recursive => json_body(&account_json(&account)),
        None => listing(&["aliases", "email", "identity", "scopes", "token"]),
        Some("aliases") => leaf("default\n"),
        Some("email") => leaf(&account.email),
        Some("scopes") => leaf(&lines(&account.scopes)),
        Some("token") => {
            let scopes = param("scopes").map(|s| {
                s.split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(String::from)
                    .collect()
            });
            match instance.access_token(scopes).await {
                Ok(t) => json_body(&json!({
                    "access_token": t.access_token,
                    "expires_in": t.expires_in,
                    "token_type": "Bearer",
                })),
                Err(e) => error(e),
            }
        }
        Some("identity") => {
            let audience = param("audience").unwrap_or("");
            if audience.is_empty() {
                return text(
                    StatusCode::BAD_REQUEST,
                    "non-empty audience parameter required\n",
                );
            }
            let format = match param("format") {
                None | Some("standard") => IdTokenFormat::Standard,
                Some("full") => IdTokenFormat::Full,
                Some(_) => {
                    return text(
                        StatusCode::BAD_REQUEST,
                        "format must be \"standard\" or \"full\"\n",
                    )
                }
            };
            match instance.id_token(audience, format).await {
                Ok(t) => leaf(&t),
                Err(e) => error(e),
            }
        }
        Some(_) => not_found(),
    }
}

fn account_json(a: &Account) -> Value {
    json!({"aliases": ["default"], "email": a.email, "scopes": a.scopes})
}

fn project_json<I: Instance + ?Sized>(i: &I) -> Value {
    // The recursive form gives the number as a JSON number.
    let n: Value = i
        .numeric_project_id()
        .parse::<u64>()
        .map(Value::from)
        .unwrap_or_else(|_| Value::from(i.numeric_project_id()));
    json!({"numericProjectId": n, "projectId": i.project_id()})
}

fn instance_json<I: Instance + ?Sized>(i: &I) -> Value {
    let mut accounts = serde_json::Map::new();
    if let Some(a) = i.service_account() {
        accounts.insert("default".into(), account_json(&a));
        accounts.insert(a.email.clone(), account_json(&a));
    }
    json!({
        "hostname": format!("emulated-instance.us-central1-a.c.{}.internal", i.project_id()),
        "id": instance_id(i).parse::<u64>().unwrap_or(0),
        "name": "emulated-instance",
        "serviceAccounts": accounts,
        "zone": zone(i),
    })
}

/// The instance id: digits derived from the project number, stable across runs.
pub fn instance_id<I: Instance + ?Sized>(i: &I) -> String {
    let n: u64 = i.numeric_project_id().parse().unwrap_or(0);
    format!("{}", 1_000_000_000_000_000_000u64 + n % 1_000_000_000_000)
}

pub fn zone<I: Instance + ?Sized>(i: &I) -> String {
    format!("projects/{}/zones/us-central1-a", i.numeric_project_id())
}

fn lines(items: &[String]) -> String {
    items.iter().map(|s| format!("{s}\n")).collect()
}

fn with_flavor(mut r: Resp) -> Resp {
    r.headers_mut()
        .insert("metadata-flavor", HeaderValue::from_static("Google"));
    r.headers_mut().insert(
        header::SERVER,
        HeaderValue::from_static("Metadata Server for VM"),
    );
    r
}

fn body(status: StatusCode, content_type: &'static str, b: String) -> Resp {
    let mut r = Response::new(Full::new(Bytes::from(b)));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    with_flavor(r)
}

fn text(status: StatusCode, s: &str) -> Resp {
    body(status, "text/plain; charset=utf-8", s.to_string())
}

/// A value, as the metadata server sends them: `application/text`.
fn leaf(s: &str) -> Resp {
    body(StatusCode::OK, "application/text", s.to_string())
}

fn listing(entries: &[&str]) -> Resp {
    leaf(&entries.iter().map(|e| format!("{e}\n")).collect::<String>())
}

fn json_body(v: &Value) -> Resp {
    body(StatusCode::OK, "application/json", v.to_string())
}

fn not_found() -> Resp {
    text(StatusCode::NOT_FOUND, "Not Found\n")
}

fn error(e: MetadataError) -> Resp {
    match e {
        MetadataError::NotFound => not_found(),
        MetadataError::Unavailable(m) => text(StatusCode::SERVICE_UNAVAILABLE, &format!("{m}\n")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    struct Fixed;

    impl Instance for Fixed {
        fn project_id(&self) -> String {
            "p".into()
        }
        fn numeric_project_id(&self) -> String {
            "42".into()
        }
        fn service_account(&self) -> Option<Account> {
            Some(Account {
                email: "vm@p.iam.gserviceaccount.com".into(),
                scopes: vec!["s1".into(), "s2".into()],
            })
        }
        fn access_token(
            &self,
            scopes: Option<Vec<String>>,
        ) -> BoxFuture<'_, Result<AccessToken, MetadataError>> {
            Box::pin(async move {
                Ok(AccessToken {
                    access_token: format!("tok:{}", scopes.unwrap_or_default().join("+")),
                    expires_in: 3599,
                })
            })
        }
        fn id_token<'a>(
            &'a self,
            audience: &'a str,
            format: IdTokenFormat,
        ) -> BoxFuture<'a, Result<String, MetadataError>> {
            Box::pin(async move { Ok(format!("jwt:{audience}:{format:?}")) })
        }
    }

    async fn get(path: &str, flavor: bool) -> (u16, String, String, Option<String>) {
        let mut h = HeaderMap::new();
        if flavor {
            h.insert("metadata-flavor", HeaderValue::from_static("Google"));
        }
        let uri: Uri = path.parse().unwrap();
        let r = serve(&Fixed, &Method::GET, &uri, &h).await;
        let flavor = r
            .headers()
            .get("metadata-flavor")
            .map(|v| v.to_str().unwrap().to_string());
        let ct = r.headers()[header::CONTENT_TYPE]
            .to_str()
            .unwrap()
            .to_string();
        let status = r.status().as_u16();
        let body = r.into_body().collect().await.unwrap().to_bytes();
        (
            status,
            ct,
            String::from_utf8(body.to_vec()).unwrap(),
            flavor,
        )
    }

    #[tokio::test]
    async fn the_protocol() {
        let sa = "/computeMetadata/v1/instance/service-accounts";
        // Every answer, errors included, carries the flavor header.
        for (path, flavor, status) in [
            ("/", true, 200),
            ("/computeMetadata/v1/", true, 200),
            ("/computeMetadata/v1/instance", true, 200),
            ("/computeMetadata/v1/instance/", true, 200),
            ("/computeMetadata/v1/instance/", false, 403),
            ("/computeMetadata/v1/nope", true, 404),
            (
                &format!("{sa}/other@p.iam.gserviceaccount.com/email"),
                true,
                404,
            ),
            (&format!("{sa}/default/identity"), true, 400),
        ] {
            let (code, _, _, f) = get(path, flavor).await;
            assert_eq!(code, status, "{path}");
            assert_eq!(f.as_deref(), Some("Google"), "{path}");
        }
        assert_eq!(
            get("/computeMetadata/v1/", true).await.2,
            "instance/\nproject/\n"
        );
        let (_, ct, body, _) = get(&format!("{sa}/default/email"), true).await;
        assert_eq!(
            (ct.as_str(), body.as_str()),
            ("application/text", "vm@p.iam.gserviceaccount.com")
        );
        assert_eq!(
            get(&format!("{sa}/vm@p.iam.gserviceaccount.com/scopes"), true)
                .await
                .2,
            "s1\ns2\n"
        );
        let (_, ct, body, _) = get(&format!("{sa}/default/?recursive=true"), true).await;
        assert_eq!(ct, "application/json");
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["email"], "vm@p.iam.gserviceaccount.com");
        assert_eq!(v["scopes"], json!(["s1", "s2"]));
        let (_, ct, body, _) = get(&format!("{sa}/default/token?scopes=a,b"), true).await;
        assert_eq!(ct, "application/json");
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["access_token"], "tok:a+b");
        assert_eq!(v["token_type"], "Bearer");
        assert_eq!(v["expires_in"], 3599);
        assert_eq!(
            get(
                &format!("{sa}/default/identity?audience=https://x&format=full"),
                true
            )
            .await
            .2,
            "jwt:https://x:Full"
        );
        assert_eq!(
            get("/computeMetadata/v1/project/project-id", true).await.2,
            "p"
        );
        assert_eq!(
            get("/computeMetadata/v1/project/numeric-project-id", true)
                .await
                .2,
            "42"
        );
        let v: Value = serde_json::from_str(
            &get("/computeMetadata/v1/project/?recursive=true", true)
                .await
                .2,
        )
        .unwrap();
        assert_eq!(v, json!({"numericProjectId": 42, "projectId": "p"}));
        let v: Value = serde_json::from_str(
            &get("/computeMetadata/v1/instance/?recursive=true", true)
                .await
                .2,
        )
        .unwrap();
        assert_eq!(
            v["serviceAccounts"]["default"]["email"],
            "vm@p.iam.gserviceaccount.com"
        );
    }
}
