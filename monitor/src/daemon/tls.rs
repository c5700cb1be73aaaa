//! The listener's rustls configuration, built from a web config's `tls_server_config`:
//! the certificate chain and key it presents (read again when renewed, `cert_reload`), the
//! client CA it verifies against for mutual TLS (read at start), and the TLS versions it
//! offers.

use std::path::Path;
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::sign::CertifiedKey;
use rustls::{InconsistentKeys, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use thiserror::Error;

use super::cert_reload::ReloadingCert;
use super::web_config::{ClientAuth, TlsSettings, TlsVersion};

/// What is wrong with the setting `key` of `tls_server_config`.
#[derive(Debug, Error)]
#[error("{message}")]
pub struct TlsError {
    pub key: &'static str,
    pub message: String,
}

fn error(key: &'static str, message: String) -> TlsError {
    TlsError { key, message }
}

/// The certificates of the PEM file `path`; at least one.
fn certificates(key: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let problem = |what: String| error(key, format!("{}: {what}", path.display()));
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|err| problem(pem_problem(err, "certificate")))?;
    if certs.is_empty() {
        return Err(problem(
            "no PEM certificate (-----BEGIN CERTIFICATE-----) in it".to_string(),
        ));
    }
    Ok(certs)
}

/// A PEM error in a line that says what to do.
fn pem_problem(err: rustls_pki_types::pem::Error, what: &str) -> String {
    match err {
        rustls_pki_types::pem::Error::Io(io) => format!(
            "cannot read it: {io} (mount or copy the {what} there, or fix the path; relative \
             paths are relative to the web config)"
        ),
        rustls_pki_types::pem::Error::NoItemsFound => format!("no PEM {what} in it"),
        other => format!("not a PEM {what}: {other}"),
    }
}

/// The chain of `cert_file` and the key of `key_file`, checked to go together.
pub(super) fn certified_key(
    cert_file: &Path,
    key_file: &Path,
    provider: &CryptoProvider,
) -> Result<CertifiedKey, TlsError> {
    let chain = certificates("cert_file", cert_file)?;
    let key = PrivateKeyDer::from_pem_file(key_file).map_err(|err| {
        error(
            "key_file",
            format!(
                "{}: {}",
                key_file.display(),
                pem_problem(err, "private key")
            ),
        )
    })?;
    CertifiedKey::from_der(chain, key, provider).map_err(|err| match err {
        rustls::Error::InconsistentKeys(InconsistentKeys::KeyMismatch) => error(
            "key_file",
            format!(
                "{} does not go with {}: give the key the certificate was issued for",
                key_file.display(),
                cert_file.display()
            ),
        ),
        other => error(
            "key_file",
            format!("{}: not a usable private key: {other}", key_file.display()),
        ),
    })
}

/// The rustls configuration `settings` describe, its files read and checked.
pub fn server_config(settings: &TlsSettings) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let certificate =
        ReloadingCert::new(&settings.cert_file, &settings.key_file, provider.clone())?;
    let versions: Vec<_> = [
        (TlsVersion::Tls12, &rustls::version::TLS12),
        (TlsVersion::Tls13, &rustls::version::TLS13),
    ]
    .into_iter()
    .filter(|(v, _)| (settings.min_version..=settings.max_version).contains(v))
    .map(|(_, version)| version)
    .collect();
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&versions)
        .map_err(|err| error("min_version", err.to_string()))?;
    let builder = match (&settings.client_ca_file, settings.client_auth) {
        (Some(ca_file), ClientAuth::VerifyIfGiven | ClientAuth::RequireAndVerify) => {
            let mut roots = RootCertStore::empty();
            for cert in certificates("client_ca_file", ca_file)? {
                roots.add(cert).map_err(|err| {
                    error(
                        "client_ca_file",
                        format!("{}: not a usable CA certificate: {err}", ca_file.display()),
                    )
                })?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
            let verifier = if settings.client_auth == ClientAuth::VerifyIfGiven {
                verifier.allow_unauthenticated()
            } else {
                verifier
            };
            builder.with_client_cert_verifier(
                verifier.build().map_err(|err| {
                    error("client_ca_file", format!("{}: {err}", ca_file.display()))
                })?,
            )
        }
        _ => builder.with_no_client_auth(),
    };
    let mut config = builder.with_cert_resolver(Arc::new(certificate));
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    /// A self-signed certificate and its key, and a second key, written to a fresh
    /// directory.
    fn files(test: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("leakscope-tls-{test}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        std::fs::write(dir.join("tls.crt"), cert.pem()).unwrap();
        std::fs::write(dir.join("tls.key"), key.serialize_pem()).unwrap();
        let other = rcgen::KeyPair::generate().unwrap();
        std::fs::write(dir.join("other.key"), other.serialize_pem()).unwrap();
        dir
    }

    fn settings(dir: &Path, key: &str) -> TlsSettings {
        TlsSettings {
            cert_file: dir.join("tls.crt"),
            key_file: dir.join(key),
            client_auth: ClientAuth::None,
            client_ca_file: None,
            min_version: TlsVersion::Tls13,
            max_version: TlsVersion::Tls13,
        }
    }

    #[test]
    fn a_certificate_and_its_key_make_a_config() {
        let dir = files("good");
        let config = server_config(&settings(&dir, "tls.key")).unwrap();
        assert_eq!(config.alpn_protocols, [b"http/1.1".to_vec()]);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn file_mistakes_name_the_key_and_the_file() {
        let dir = files("bad");
        let err = server_config(&settings(&dir, "other.key")).unwrap_err();
        assert_eq!(err.key, "key_file");
        assert!(err.message.contains("does not go with"), "{err}");
        let err = server_config(&settings(&dir, "missing.key")).unwrap_err();
        assert_eq!(err.key, "key_file");
        assert!(err.message.contains("missing.key: cannot read it"), "{err}");
        let mut ca = settings(&dir, "tls.key");
        ca.client_auth = ClientAuth::RequireAndVerify;
        ca.client_ca_file = Some(dir.join("tls.key"));
        let err = server_config(&ca).unwrap_err();
        assert_eq!(err.key, "client_ca_file");
        assert!(err.message.contains("no PEM certificate"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
