//! The listener's web config file (`leakscope daemon --web-config FILE`), in the format of
//! Prometheus' exporter-toolkit (its `docs/web-configuration.md`), so the file an operator
//! already writes for node_exporter works here too:
//!
//! ```yaml
//! tls_server_config:
//!   cert_file: server.crt        # relative paths are relative to this file
//!   key_file: server.key
//!   client_auth_type: RequireAndVerifyClientCert   # optional: mTLS
//!   client_ca_file: clients-ca.crt
//!   min_version: TLS12
//! basic_auth_users:
//!   prometheus: $2y$10$...       # bcrypt, e.g. `htpasswd -nbBC 10 "" PASSWORD | tr -d ':\n'`
//! http_server_config:
//!   headers:
//!     Strict-Transport-Security: max-age=31536000
//! ```
//!
//! Every mistake is one line naming the file and the key. The certificate files are read
//! here too (`tls`), so a bad path stops the daemon at start, and `check-config` sees it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::http::{HeaderName, HeaderValue};
use serde::Deserialize;
use serde_norway::Value;
use thiserror::Error;

use super::tls;

#[derive(Debug, Error)]
pub enum WebConfigError {
    // Not `source`: the cause is in this one line already, not repeated after it.
    #[error(
        "cannot read the web config {path}: {error} (--web-config, or web_config in the \
         config file, names a YAML file of TLS and basic auth settings)"
    )]
    Read { path: String, error: std::io::Error },
    #[error("web config {path}: {message} (see README, \"The listener\")")]
    Syntax { path: String, message: String },
    #[error("web config {path}: {key}: {message}")]
    Setting {
        path: String,
        key: String,
        message: String,
    },
}

/// The file as written. Keys exporter-toolkit knows but leakscope does not implement are
/// read (as `Value`) so that they are refused with a reason rather than as unknown.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    tls_server_config: Option<RawTls>,
    #[serde(default)]
    basic_auth_users: BTreeMap<String, String>,
    http_server_config: Option<RawHttp>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    cert_file: Option<PathBuf>,
    key_file: Option<PathBuf>,
    client_auth_type: Option<String>,
    client_ca_file: Option<PathBuf>,
    min_version: Option<String>,
    max_version: Option<String>,
    cert: Option<Value>,
    key: Option<Value>,
    client_ca: Option<Value>,
    client_allowed_sans: Option<Value>,
    cipher_suites: Option<Value>,
    curve_preferences: Option<Value>,
    prefer_server_cipher_suites: Option<Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHttp {
    #[serde(default)]
    headers: BTreeMap<String, String>,
    http2: Option<bool>,
}

/// Whether and how clients must present a certificate (exporter-toolkit's names).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    /// `NoClientCert`, the default.
    None,
    /// `VerifyClientCertIfGiven`: a client may present none; one it presents must verify.
    VerifyIfGiven,
    /// `RequireAndVerifyClientCert`: mutual TLS.
    RequireAndVerify,
}

/// The TLS versions rustls speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum TlsVersion {
    Tls12,
    Tls13,
}

/// `tls_server_config`, checked; paths resolved against the web config's directory.
#[derive(Debug, Clone, PartialEq)]
pub struct TlsSettings {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    pub client_auth: ClientAuth,
    pub client_ca_file: Option<PathBuf>,
    pub min_version: TlsVersion,
    pub max_version: TlsVersion,
}

/// A checked web config: what the listener serves with.
#[derive(Debug, Clone)]
pub struct WebConfig {
    pub path: PathBuf,
    pub tls: Option<TlsSettings>,
    /// The rustls configuration built from `tls` (its files read and checked).
    pub tls_config: Option<Arc<rustls::ServerConfig>>,
    /// User name → bcrypt hash; empty when basic auth is off.
    pub users: BTreeMap<String, String>,
    /// Added to every response.
    pub headers: Vec<(HeaderName, HeaderValue)>,
}

/// The response headers exporter-toolkit lets a web config set (others, such as
/// Content-Type, belong to the handlers).
const ALLOWED_HEADERS: [&str; 5] = [
    "Strict-Transport-Security",
    "X-Content-Type-Options",
    "X-Frame-Options",
    "X-XSS-Protection",
    "Content-Security-Policy",
];

/// Reads and checks the web config at `path`, including its certificate files.
pub fn load(path: &Path) -> Result<WebConfig, WebConfigError> {
    let text = std::fs::read_to_string(path).map_err(|error| WebConfigError::Read {
        path: path.display().to_string(),
        error,
    })?;
    let config = parse(path, &text)?;
    let tls_config = match &config.tls {
        Some(settings) => {
            Some(
                tls::server_config(settings).map_err(|err| WebConfigError::Setting {
                    path: path.display().to_string(),
                    key: format!("tls_server_config.{}", err.key),
                    message: err.to_string(),
                })?,
            )
        }
        None => None,
    };
    Ok(WebConfig {
        tls_config,
        ..config
    })
}

/// Parses and checks the settings of `text` (the file at `path`) without reading the
/// certificate files.
fn parse(path: &Path, text: &str) -> Result<WebConfig, WebConfigError> {
    let shown = path.display().to_string();
    // An empty file is a valid exporter-toolkit config: plain HTTP, no auth.
    let raw: RawFile = if text.trim().is_empty() {
        RawFile::default()
    } else {
        serde_norway::from_str(text).map_err(|err| WebConfigError::Syntax {
            path: shown.clone(),
            message: err.to_string(),
        })?
    };
    let setting = |key: &str, message: String| WebConfigError::Setting {
        path: shown.clone(),
        key: key.to_string(),
        message,
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    let tls = raw
        .tls_server_config
        .map(|t| tls_settings(t, dir))
        .transpose()
        .map_err(|(key, message)| setting(&format!("tls_server_config.{key}"), message))?;
    for (user, hash) in &raw.basic_auth_users {
        check_user(user, hash)
            .map_err(|message| setting(&format!("basic_auth_users.{user}"), message))?;
    }
    let http = raw.http_server_config.unwrap_or_default();
    let mut headers = Vec::new();
    for (name, value) in &http.headers {
        let key = format!("http_server_config.headers.{name}");
        if !ALLOWED_HEADERS.iter().any(|h| h.eq_ignore_ascii_case(name)) {
            return Err(setting(
                &key,
                format!(
                    "this header cannot be set; the ones that can: {}",
                    ALLOWED_HEADERS.join(", ")
                ),
            ));
        }
        let value = HeaderValue::from_str(value)
            .map_err(|_| setting(&key, "not a valid header value".into()))?;
        let name = HeaderName::from_bytes(name.as_bytes()).expect("an allowed header name");
        headers.push((name, value));
    }
    if http.http2 == Some(true) {
        log::info!("{shown}: http_server_config.http2 is ignored: leakscope serves HTTP/1.1");
    }
    Ok(WebConfig {
        path: path.to_path_buf(),
        tls,
        tls_config: None,
        users: raw.basic_auth_users,
        headers,
    })
}

/// `tls_server_config`'s rules; an error is (key, what is wrong and what to do).
fn tls_settings(raw: RawTls, dir: &Path) -> Result<TlsSettings, (&'static str, String)> {
    let unsupported = [
        (
            "cert",
            raw.cert.is_some(),
            "put the certificate in a file: cert_file",
        ),
        ("key", raw.key.is_some(), "put the key in a file: key_file"),
        (
            "client_ca",
            raw.client_ca.is_some(),
            "put the CA in a file: client_ca_file",
        ),
        (
            "client_allowed_sans",
            raw.client_allowed_sans.is_some(),
            "give the clients a CA of their own (client_ca_file) instead",
        ),
        (
            "cipher_suites",
            raw.cipher_suites.is_some(),
            "rustls offers only modern suites; remove it",
        ),
        (
            "curve_preferences",
            raw.curve_preferences.is_some(),
            "rustls offers only modern curves; remove it",
        ),
        (
            "prefer_server_cipher_suites",
            raw.prefer_server_cipher_suites.is_some(),
            "rustls offers only modern suites; remove it",
        ),
    ];
    if let Some((key, _, what)) = unsupported.into_iter().find(|(_, given, _)| *given) {
        return Err((key, format!("not supported by leakscope: {what}")));
    }
    // `join` keeps an absolute path as it is.
    let resolve = |p: PathBuf| dir.join(p);
    let cert_file = raw.cert_file.ok_or((
        "cert_file",
        "missing: give the PEM certificate (chain) the server presents".to_string(),
    ))?;
    let key_file = raw.key_file.ok_or((
        "key_file",
        "missing: give the PEM private key of cert_file".to_string(),
    ))?;
    let client_auth = match raw.client_auth_type.as_deref() {
        None | Some("NoClientCert") => ClientAuth::None,
        Some("VerifyClientCertIfGiven") => ClientAuth::VerifyIfGiven,
        Some("RequireAndVerifyClientCert") => ClientAuth::RequireAndVerify,
        Some(other @ ("RequestClientCert" | "RequireAnyClientCert")) => {
            return Err((
                "client_auth_type",
                format!(
                    "{other} accepts certificates nobody verified, which leakscope does not \
                     do: use RequireAndVerifyClientCert with client_ca_file"
                ),
            ));
        }
        Some(other) => {
            return Err((
                "client_auth_type",
                format!(
                    "unknown value {other:?}: one of NoClientCert, VerifyClientCertIfGiven, \
                     RequireAndVerifyClientCert"
                ),
            ));
        }
    };
    match (client_auth, &raw.client_ca_file) {
        (ClientAuth::None, Some(_)) => {
            return Err((
                "client_ca_file",
                "given without a client_auth_type that verifies client certificates: add \
                 client_auth_type: RequireAndVerifyClientCert"
                    .to_string(),
            ));
        }
        (ClientAuth::VerifyIfGiven | ClientAuth::RequireAndVerify, None) => {
            return Err((
                "client_ca_file",
                "missing: client_auth_type verifies client certificates against this CA"
                    .to_string(),
            ));
        }
        _ => {}
    }
    let version = |key: &'static str, value: Option<&str>, default: TlsVersion| match value {
        None => Ok(default),
        Some("TLS12") => Ok(TlsVersion::Tls12),
        Some("TLS13") => Ok(TlsVersion::Tls13),
        Some(old @ ("TLS10" | "TLS11")) => Err((
            key,
            format!("{old} is not offered (rustls speaks TLS 1.2 and 1.3): use TLS12"),
        )),
        Some(other) => Err((key, format!("unknown version {other:?}: TLS12 or TLS13"))),
    };
    let min_version = version("min_version", raw.min_version.as_deref(), TlsVersion::Tls12)?;
    let max_version = version("max_version", raw.max_version.as_deref(), TlsVersion::Tls13)?;
    if min_version > max_version {
        return Err((
            "max_version",
            "below min_version: no version is left".to_string(),
        ));
    }
    Ok(TlsSettings {
        cert_file: resolve(cert_file),
        key_file: resolve(key_file),
        client_auth,
        client_ca_file: raw.client_ca_file.map(resolve),
        min_version,
        max_version,
    })
}

/// A user name Basic auth can carry, and a bcrypt hash (`$2a$`, `$2b$`, `$2y$`...).
fn check_user(user: &str, hash: &str) -> Result<(), String> {
    if user.is_empty() || user.contains(':') {
        return Err(
            "a user name must be non-empty and without ':' (Basic auth's separator)".into(),
        );
    }
    hash.parse::<bcrypt::HashParts>()
        .map(|_| ())
        .map_err(|err| {
            format!(
                "not a bcrypt hash ({err}): give the hash, not the password, e.g. the output of \
             `htpasswd -nbBC 10 \"\" PASSWORD | tr -d ':\\n'`"
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    const HASH: &str = "$2y$10$QOauhQNbBCuQDKes6eFzPeMqBSjb7Mr5DUmpZ/VcEd00UAV/LDeSi";

    fn err(text: &str) -> String {
        let err = parse(Path::new("/etc/leakscope/web.yml"), text)
            .unwrap_err()
            .to_string();
        assert_eq!(err.lines().count(), 1, "{err}");
        err
    }

    #[test]
    fn reads_tls_users_and_headers() {
        let config = parse(
            Path::new("/etc/leakscope/web.yml"),
            &format!(
                "tls_server_config:\n  cert_file: tls/server.crt\n  key_file: /keys/server.key\n\
                 \x20 client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: ca.crt\n\
                 \x20 min_version: TLS13\nbasic_auth_users:\n  prometheus: {HASH}\n\
                 http_server_config:\n  headers:\n    X-Frame-Options: deny\n"
            ),
        )
        .unwrap();
        let tls = config.tls.unwrap();
        assert_eq!(
            tls.cert_file,
            PathBuf::from("/etc/leakscope/tls/server.crt")
        );
        assert_eq!(tls.key_file, PathBuf::from("/keys/server.key"));
        assert_eq!(tls.client_auth, ClientAuth::RequireAndVerify);
        assert_eq!(
            tls.client_ca_file,
            Some(PathBuf::from("/etc/leakscope/ca.crt"))
        );
        assert_eq!(
            (tls.min_version, tls.max_version),
            (TlsVersion::Tls13, TlsVersion::Tls13)
        );
        assert_eq!(config.users["prometheus"], HASH);
        assert_eq!(config.headers[0].0, "x-frame-options");
    }

    #[test]
    fn an_empty_file_is_plain_http_without_auth() {
        let config = parse(Path::new("web.yml"), "# nothing yet\n").unwrap();
        assert!(config.tls.is_none() && config.users.is_empty());
    }

    #[test]
    fn an_unknown_key_names_the_file_and_the_key() {
        let e = err("tls_server_config:\n  cert_file: a\n  key_file: b\n  certfile: c\n");
        assert!(
            e.starts_with(
                "web config /etc/leakscope/web.yml: tls_server_config: unknown field `certfile`"
            ),
            "{e}"
        );
        assert!(e.contains("line 4"), "{e}");
        let e = err("basic_auth:\n  a: b\n");
        assert!(e.contains("unknown field `basic_auth`"), "{e}");
    }

    #[test]
    fn a_password_instead_of_a_hash_is_refused() {
        let e = err("basic_auth_users:\n  prometheus: hunter2\n");
        assert!(
            e.starts_with(
                "web config /etc/leakscope/web.yml: basic_auth_users.prometheus: not a bcrypt hash"
            ),
            "{e}"
        );
        assert!(e.contains("htpasswd"), "{e}");
    }

    #[test]
    fn tls_mistakes_say_what_to_do() {
        let e = err("tls_server_config:\n  cert_file: a.crt\n");
        assert!(e.contains("tls_server_config.key_file: missing"), "{e}");
        let e = err("tls_server_config:\n  cert_file: a\n  key_file: b\n  client_ca_file: c\n");
        assert!(
            e.contains("client_auth_type: RequireAndVerifyClientCert"),
            "{e}"
        );
        let e = err("tls_server_config:\n  cert_file: a\n  key_file: b\n  \
             client_auth_type: RequireAndVerifyClientCert\n");
        assert!(
            e.contains("tls_server_config.client_ca_file: missing"),
            "{e}"
        );
        let e = err("tls_server_config:\n  cert_file: a\n  key_file: b\n  min_version: TLS10\n");
        assert!(e.contains("use TLS12"), "{e}");
        let e = err("tls_server_config:\n  cert_file: a\n  key_file: b\n  cipher_suites: [x]\n");
        assert!(
            e.contains("tls_server_config.cipher_suites: not supported"),
            "{e}"
        );
    }

    #[test]
    fn only_security_headers_can_be_set() {
        let e = err("http_server_config:\n  headers:\n    Content-Type: text/html\n");
        assert!(
            e.contains("http_server_config.headers.Content-Type: this header cannot be set"),
            "{e}"
        );
    }

    #[test]
    fn the_shipped_example_reads() {
        let config = parse(
            Path::new("/etc/leakscope/web-config.yml"),
            include_str!("../../deploy/web-config.yml"),
        )
        .unwrap();
        let tls = config.tls.unwrap();
        assert_eq!(tls.cert_file, PathBuf::from("/etc/leakscope/tls.crt"));
        assert_eq!(tls.client_auth, ClientAuth::None);
        // The placeholder its comment names, so that nobody wonders what it is.
        assert!(bcrypt::verify("changeme", &config.users["prometheus"]).unwrap());
    }

    #[test]
    fn a_missing_file_is_named() {
        let e = load(Path::new("/nonexistent/web.yml"))
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("cannot read the web config /nonexistent/web.yml: No such file"),
            "{e}"
        );
    }
}
