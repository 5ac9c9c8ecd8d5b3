//! What clients need to find and trust the proxy: `impersonate-proxy env`. One line per
//! variable, for every client family, in the shell's syntax (`--format sh|fish|dotenv`), and
//! the files some clients need beside the merged bundle:
//!
//! - **The merged bundle** (system roots + the proxy's CA) for the variables that *replace* a
//!   client's trust store: `SSL_CERT_FILE`, `REQUESTS_CA_BUNDLE`, `CURL_CA_BUNDLE`,
//!   `GRPC_DEFAULT_SSL_ROOTS_FILE_PATH`, `CLOUDSDK_CORE_CUSTOM_CA_CERTS_FILE`. Node adds
//!   `NODE_EXTRA_CA_CERTS` to its own roots, so it gets the CA alone.
//! - **The proxy**: `HTTPS_PROXY`/`https_proxy`, gcloud's `CLOUDSDK_PROXY_*`, and
//!   `NODE_USE_ENV_PROXY=1` for Node's built-in fetch; `NO_PROXY`/`no_proxy` keep loopback
//!   and the metadata addresses direct (gaxios sends even `http://169.254.169.254` to
//!   `HTTPS_PROXY` otherwise).
//! - **The metadata facade**, when configured: `GCE_METADATA_HOST` and `GCE_METADATA_IP`
//!   (google-auth-library-python reads the first for its requests and the second for its
//!   ping), `GCE_METADATA_ROOT` (gcloud and gsutil's oauth2client), and
//!   `METADATA_SERVER_DETECTION=assume-present` (Node's gcp-metadata), plus the project.
//! - **gsutil** ignores `SSL_CERT_FILE` and `REQUESTS_CA_BUNDLE` (it trusts its bundled
//!   `cacerts.txt`), so it gets a boto file, pointed to by `BOTO_CONFIG`.
//! - **Java** gets `JAVA_TOOL_OPTIONS` with the proxy's host and port and a PKCS#12
//!   truststore: the JDK's own roots plus the CA, written with the JDK's `keytool` when there
//!   is one (and a plain line saying so when there is not).

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use crate::config::Config;

/// The syntax of the lines `env` prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// `export NAME='value'` (bash, zsh, sh)
    Sh,
    /// `set -gx NAME 'value'`
    Fish,
    /// `NAME=value`, for `docker --env-file`, Kubernetes and `.env` files
    Dotenv,
}

/// Where `env`'s files go: beside the CA certificate.
pub struct Files {
    pub ca: PathBuf,
    pub bundle: PathBuf,
    pub boto: PathBuf,
    pub truststore: PathBuf,
}

impl Files {
    pub fn beside(ca_cert: &Path) -> Files {
        Files {
            ca: ca_cert.to_path_buf(),
            bundle: ca_cert.with_file_name("bundle.pem"),
            boto: ca_cert.with_file_name("boto.cfg"),
            truststore: ca_cert.with_file_name("truststore.p12"),
        }
    }
}

/// The truststore's password: a truststore holds public certificates only, and the JDK's own
/// is protected by the same well-known word.
pub const TRUSTSTORE_PASSWORD: &str = "changeit";

/// Hosts that never go through the proxy: loopback (the facade lives there) and the metadata
/// server's names.
const NO_PROXY: &str = "localhost,127.0.0.1,::1,169.254.169.254,metadata.google.internal,metadata";

/// An address clients can reach: a wildcard listen address is reached on loopback.
fn reachable(addr: SocketAddr) -> SocketAddr {
    if addr.ip().is_unspecified() {
        SocketAddr::new(
            if addr.is_ipv4() {
                [127, 0, 0, 1].into()
            } else {
                std::net::Ipv6Addr::LOCALHOST.into()
            },
            addr.port(),
        )
    } else {
        addr
    }
}

/// The variables, in order, as (name, value) or a comment line.
pub enum Line {
    Var(&'static str, String),
    Comment(String),
}

/// Every line `env` prints for `config`. `java` says whether the truststore was written
/// (`Ok`) or why not (`Err`).
pub fn lines(config: &Config, files: &Files, java: &Result<(), String>) -> Vec<Line> {
    let proxy = reachable(config.listen);
    let proxy_url = format!("http://{proxy}");
    let path = |p: &Path| p.display().to_string();
    let mut out = vec![
        Line::Var("HTTPS_PROXY", proxy_url.clone()),
        Line::Var("https_proxy", proxy_url),
        Line::Var("NO_PROXY", NO_PROXY.into()),
        Line::Var("no_proxy", NO_PROXY.into()),
        Line::Comment(
            "These replace a client's trust store, so they get the merged bundle:".into(),
        ),
    ];
    for var in [
        "SSL_CERT_FILE",
        "REQUESTS_CA_BUNDLE",
        "CURL_CA_BUNDLE",
        "GRPC_DEFAULT_SSL_ROOTS_FILE_PATH",
        "CLOUDSDK_CORE_CUSTOM_CA_CERTS_FILE",
    ] {
        out.push(Line::Var(var, path(&files.bundle)));
    }
    out.push(Line::Comment("gcloud's own proxy settings:".into()));
    out.push(Line::Var("CLOUDSDK_PROXY_TYPE", "http".into()));
    out.push(Line::Var("CLOUDSDK_PROXY_ADDRESS", proxy.ip().to_string()));
    out.push(Line::Var("CLOUDSDK_PROXY_PORT", proxy.port().to_string()));
    out.push(Line::Comment(
        "Node adds this CA to its own roots; NODE_USE_ENV_PROXY makes its fetch use HTTPS_PROXY:"
            .into(),
    ));
    out.push(Line::Var("NODE_EXTRA_CA_CERTS", path(&files.ca)));
    out.push(Line::Var("NODE_USE_ENV_PROXY", "1".into()));
    if let Some(m) = &config.facade.metadata {
        let host = reachable(m.listen).to_string();
        out.push(Line::Comment(
            "The metadata-server facade: Google's libraries find their credential here:".into(),
        ));
        for var in ["GCE_METADATA_HOST", "GCE_METADATA_IP", "GCE_METADATA_ROOT"] {
            out.push(Line::Var(var, host.clone()));
        }
        out.push(Line::Var(
            "METADATA_SERVER_DETECTION",
            "assume-present".into(),
        ));
        out.push(Line::Var("GOOGLE_CLOUD_PROJECT", m.project_id.clone()));
        out.push(Line::Var("CLOUDSDK_CORE_PROJECT", m.project_id.clone()));
    }
    out.push(Line::Comment(
        "gsutil trusts only its own bundle; its boto file names the proxy and ours:".into(),
    ));
    out.push(Line::Var("BOTO_CONFIG", path(&files.boto)));
    match java {
        Ok(()) => {
            out.push(Line::Comment(
                "Java: the JDK's roots plus the proxy CA, and the proxy:".into(),
            ));
            out.push(Line::Var(
                "JAVA_TOOL_OPTIONS",
                format!(
                    "-Djavax.net.ssl.trustStore={} -Djavax.net.ssl.trustStoreType=PKCS12 \
                     -Djavax.net.ssl.trustStorePassword={TRUSTSTORE_PASSWORD} \
                     -Dhttps.proxyHost={} -Dhttps.proxyPort={} \
                     -Dhttp.nonProxyHosts=localhost|127.0.0.1|169.254.169.254|metadata.google.internal",
                    path(&files.truststore),
                    proxy.ip(),
                    proxy.port()
                ),
            ));
        }
        Err(why) => out.push(Line::Comment(format!(
            "Java: no truststore was written ({why}); run `impersonate-proxy env` where a JDK is installed, or import {} into your truststore",
            path(&files.ca)
        ))),
    }
    out
}

/// The lines in `format`'s syntax, values quoted so a shell reads them back unchanged.
pub fn render(lines: &[Line], format: Format) -> String {
    let mut s = String::new();
    for line in lines {
        match (line, format) {
            (Line::Comment(c), _) => {
                let _ = writeln!(s, "# {c}");
            }
            (Line::Var(k, v), Format::Sh) => {
                let _ = writeln!(s, "export {k}={}", single_quoted(v));
            }
            (Line::Var(k, v), Format::Fish) => {
                let _ = writeln!(s, "set -gx {k} {}", single_quoted(v));
            }
            (Line::Var(k, v), Format::Dotenv) => {
                let _ = writeln!(s, "{k}={v}");
            }
        }
    }
    s
}

/// `'…'` with every `'` closed, escaped and reopened: safe in sh and fish alike.
fn single_quoted(v: &str) -> String {
    format!("'{}'", v.replace('\'', r"'\''"))
}

/// gsutil's boto file: the proxy, the merged bundle, and the default project.
pub fn boto(config: &Config, files: &Files) -> String {
    let proxy = reachable(config.listen);
    let mut s = String::new();
    let _ = writeln!(
        s,
        "# Written by `impersonate-proxy env`: gsutil through the proxy."
    );
    let _ = writeln!(s, "[Boto]");
    let _ = writeln!(s, "proxy = {}", proxy.ip());
    let _ = writeln!(s, "proxy_port = {}", proxy.port());
    let _ = writeln!(s, "proxy_type = http");
    let _ = writeln!(s, "ca_certificates_file = {}", files.bundle.display());
    let _ = writeln!(s, "https_validate_certificates = True");
    if let Some(m) = &config.facade.metadata {
        let _ = writeln!(s, "\n[GSUtil]");
        let _ = writeln!(s, "default_project_id = {}", m.project_id);
        let _ = writeln!(s, "\n[GoogleCompute]");
        let _ = writeln!(s, "service_account = default");
    }
    s
}

/// Write the PKCS#12 truststore: the JDK's `cacerts` plus the proxy's CA, with the JDK's
/// `keytool`. `Err` says why it could not be written (no JDK, most often).
pub fn write_truststore(files: &Files) -> Result<(), String> {
    let keytool = which("keytool").ok_or("no JDK found: `keytool` is not on PATH")?;
    // keytool is `$JAVA_HOME/bin/keytool`; the JDK's roots are `$JAVA_HOME/lib/security/cacerts`.
    let real = std::fs::canonicalize(&keytool).map_err(|e| e.to_string())?;
    let home = real
        .parent()
        .and_then(Path::parent)
        .ok_or("cannot tell the JDK's home from keytool's path")?;
    let cacerts = home.join("lib/security/cacerts");
    let tmp = files.truststore.with_extension("p12.tmp");
    let _ = std::fs::remove_file(&tmp);
    let run = |args: &[&std::ffi::OsStr]| -> Result<(), String> {
        let out = std::process::Command::new(&keytool)
            .args(args)
            .output()
            .map_err(|e| format!("keytool: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "keytool: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    };
    let pass = std::ffi::OsStr::new(TRUSTSTORE_PASSWORD);
    if cacerts.exists() {
        run(&[
            "-importkeystore".as_ref(),
            "-noprompt".as_ref(),
            "-srckeystore".as_ref(),
            cacerts.as_os_str(),
            "-srcstorepass".as_ref(),
            pass,
            "-destkeystore".as_ref(),
            tmp.as_os_str(),
            "-deststoretype".as_ref(),
            "PKCS12".as_ref(),
            "-deststorepass".as_ref(),
            pass,
        ])?;
    }
    run(&[
        "-importcert".as_ref(),
        "-noprompt".as_ref(),
        "-alias".as_ref(),
        "impersonate-proxy".as_ref(),
        "-file".as_ref(),
        files.ca.as_os_str(),
        "-keystore".as_ref(),
        tmp.as_os_str(),
        "-storetype".as_ref(),
        "PKCS12".as_ref(),
        "-storepass".as_ref(),
        pass,
    ])?;
    std::fs::rename(&tmp, &files.truststore).map_err(|e| e.to_string())
}

fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(program))
            .find(|p| p.is_file())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: &str) -> Config {
        Config::from_yaml(
            &format!(
                "listen: 0.0.0.0:8080\nserve_anyone: true\nidentities: {{ dev: {{ service_account: dev@p.iam.gserviceaccount.com }} }}\n{extra}"
            ),
            "t.yaml",
        )
        .unwrap()
    }

    #[test]
    fn every_client_family_gets_its_lines_with_real_values() {
        let c = config("facade: { metadata: { identity: dev, project_id: my-proj } }\n");
        let files = Files::beside(Path::new("/c/ca.pem"));
        let text = render(&lines(&c, &files, &Ok(())), Format::Dotenv);
        for line in [
            "HTTPS_PROXY=http://127.0.0.1:8080",
            "https_proxy=http://127.0.0.1:8080",
            "NO_PROXY=localhost,127.0.0.1,::1,169.254.169.254,metadata.google.internal,metadata",
            "SSL_CERT_FILE=/c/bundle.pem",
            "REQUESTS_CA_BUNDLE=/c/bundle.pem",
            "CURL_CA_BUNDLE=/c/bundle.pem",
            "GRPC_DEFAULT_SSL_ROOTS_FILE_PATH=/c/bundle.pem",
            "CLOUDSDK_CORE_CUSTOM_CA_CERTS_FILE=/c/bundle.pem",
            "CLOUDSDK_PROXY_ADDRESS=127.0.0.1",
            "CLOUDSDK_PROXY_PORT=8080",
            "NODE_EXTRA_CA_CERTS=/c/ca.pem",
            "NODE_USE_ENV_PROXY=1",
            "GCE_METADATA_HOST=127.0.0.1:8181",
            "GCE_METADATA_IP=127.0.0.1:8181",
            "GCE_METADATA_ROOT=127.0.0.1:8181",
            "METADATA_SERVER_DETECTION=assume-present",
            "GOOGLE_CLOUD_PROJECT=my-proj",
            "BOTO_CONFIG=/c/boto.cfg",
            "-Djavax.net.ssl.trustStore=/c/truststore.p12",
            "-Dhttps.proxyHost=127.0.0.1 -Dhttps.proxyPort=8080",
        ] {
            assert!(text.contains(line), "missing {line}:\n{text}");
        }
        assert!(!text.contains("=HOST") && !text.contains("=PORT"), "{text}");
        // Without a facade, no metadata lines; without a JDK, a plain word instead of Java's.
        let c = config("");
        let text = render(&lines(&c, &files, &Err("no JDK found".into())), Format::Sh);
        assert!(!text.contains("GCE_METADATA_HOST"), "{text}");
        assert!(
            text.contains("# Java: no truststore was written (no JDK found)"),
            "{text}"
        );
        assert!(
            text.contains("export HTTPS_PROXY='http://127.0.0.1:8080'"),
            "{text}"
        );
    }

    #[test]
    fn quoting_survives_each_shell() {
        let l = [Line::Var("X", "a b'c".into())];
        assert_eq!(render(&l, Format::Sh), "export X='a b'\\''c'\n");
        assert_eq!(render(&l, Format::Fish), "set -gx X 'a b'\\''c'\n");
        assert_eq!(render(&l, Format::Dotenv), "X=a b'c\n");
    }

    #[test]
    fn the_boto_file_names_proxy_bundle_and_project() {
        let c = config("facade: { metadata: { identity: dev, project_id: my-proj } }\n");
        let b = boto(&c, &Files::beside(Path::new("/c/ca.pem")));
        for line in [
            "proxy = 127.0.0.1",
            "proxy_port = 8080",
            "ca_certificates_file = /c/bundle.pem",
            "default_project_id = my-proj",
        ] {
            assert!(b.contains(line), "missing {line}:\n{b}");
        }
    }
}
