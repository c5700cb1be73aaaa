//! The listener's certificate, read again when its files change, so a renewal (by
//! cert-manager into a Secret volume, by certbot, by hand) is served without a restart,
//! as exporter-toolkit serves it. A renewal that does not load (a key that does not go
//! with its certificate, a file still being written) keeps the previous certificate.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use log::{info, warn};
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use super::tls::{TlsError, certified_key};

/// How often a handshake looks at the files: a stat of each, at most once a second.
const RECHECK: Duration = Duration::from_secs(1);

/// What identifies a version of a file: a Secret volume swaps in new files (new inode), an
/// editor or `cp` rewrites in place (new length or time; times alone are coarse, a few ms).
type Stamp = Option<(SystemTime, u64, u64)>;

fn stamp(path: &Path) -> Stamp {
    use std::os::unix::fs::MetadataExt as _;
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len(), meta.ino()))
}

#[derive(Debug)]
struct Loaded {
    key: Arc<CertifiedKey>,
    stamps: (Stamp, Stamp),
    checked: Instant,
}

/// Serves the certificate and key of `cert_file` and `key_file`, as they are now.
#[derive(Debug)]
pub struct ReloadingCert {
    cert_file: PathBuf,
    key_file: PathBuf,
    provider: Arc<CryptoProvider>,
    recheck: Duration,
    loaded: Mutex<Loaded>,
}

impl ReloadingCert {
    /// Reads the files now; a mistake in them is the daemon's to report at start.
    pub fn new(
        cert_file: &Path,
        key_file: &Path,
        provider: Arc<CryptoProvider>,
    ) -> Result<Self, TlsError> {
        let stamps = (stamp(cert_file), stamp(key_file));
        let key = Arc::new(certified_key(cert_file, key_file, &provider)?);
        Ok(Self {
            cert_file: cert_file.to_path_buf(),
            key_file: key_file.to_path_buf(),
            provider,
            recheck: RECHECK,
            loaded: Mutex::new(Loaded {
                key,
                stamps,
                checked: Instant::now(),
            }),
        })
    }

    /// The certificate to present: the files' current one, or the last that loaded.
    fn current(&self) -> Arc<CertifiedKey> {
        let mut loaded = self.loaded.lock().unwrap_or_else(|e| e.into_inner());
        if loaded.checked.elapsed() < self.recheck {
            return loaded.key.clone();
        }
        loaded.checked = Instant::now();
        let stamps = (stamp(&self.cert_file), stamp(&self.key_file));
        if stamps == loaded.stamps {
            return loaded.key.clone();
        }
        // Not retried until the files change again: one warning per bad version.
        loaded.stamps = stamps;
        match certified_key(&self.cert_file, &self.key_file, &self.provider) {
            Ok(key) => {
                info!(
                    "serving the renewed certificate {}",
                    self.cert_file.display()
                );
                loaded.key = Arc::new(key);
            }
            Err(err) => warn!(
                "tls_server_config.{}: {err}; still serving the previous certificate",
                err.key
            ),
        }
        loaded.key.clone()
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A self-signed certificate for `name` and its key, as PEM.
    fn pair(name: &str) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec![name.to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        (cert.pem(), key.serialize_pem())
    }

    #[test]
    fn a_renewal_is_served_and_a_broken_one_is_not() {
        let dir = std::env::temp_dir().join(format!("leakscope-reload-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (cert_file, key_file) = (dir.join("tls.crt"), dir.join("tls.key"));
        let write = |(cert, key): &(String, String)| {
            std::fs::write(&cert_file, cert).unwrap();
            std::fs::write(&key_file, key).unwrap();
        };
        write(&pair("first"));
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut reloading = ReloadingCert::new(&cert_file, &key_file, provider).unwrap();
        reloading.recheck = Duration::ZERO;
        let served = |r: &ReloadingCert| r.current().cert[0].clone();
        let first_der = served(&reloading);

        let second = pair("second");
        write(&second);
        let second_der = served(&reloading);
        assert_ne!(second_der, first_der, "the renewal is served");

        // The key of another certificate (of another length than the last key, so that
        // the change is seen however coarse the file times): the last good one stays.
        let other = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
        std::fs::write(&key_file, other.serialize_pem()).unwrap();
        assert_eq!(served(&reloading), second_der);
        std::fs::write(&cert_file, "not yet").unwrap();
        assert_eq!(served(&reloading), second_der);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
