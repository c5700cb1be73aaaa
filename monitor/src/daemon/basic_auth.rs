//! HTTP Basic auth against the web config's bcrypt hashes, as exporter-toolkit does it:
//! an unknown user costs the same bcrypt as a known one (no user enumeration by timing),
//! bcrypt runs one at a time off the async workers (a flood of wrong passwords costs one
//! core, not the runtime), and successful checks are cached, since bcrypt at cost 10 takes
//! 50-100 ms and Prometheus sends the same credentials every scrape.

use std::collections::{BTreeMap, HashSet};
use std::sync::Mutex;

use axum::http::HeaderValue;
use base64::Engine as _;

/// A bcrypt hash of "fakepassword" (exporter-toolkit's), checked when the user is unknown
/// so that the answer takes as long as for a known user.
const UNKNOWN_USER_HASH: &str = "$2y$10$QOauhQNbBCuQDKes6eFzPeMqBSjb7Mr5DUmpZ/VcEd00UAV/LDeSi";

/// Successful checks remembered at most; beyond, the cache starts over. Only accepted
/// credentials enter it, so it holds about one entry per user.
const CACHE_MAX: usize = 128;

/// The users and their hashes, and the credentials bcrypt already accepted.
#[derive(Debug)]
pub struct BasicAuth {
    users: BTreeMap<String, String>,
    /// SHA-256 of `user:password` for each accepted pair: a cache hit skips bcrypt, and the
    /// cache holds no password.
    accepted: Mutex<HashSet<[u8; 32]>>,
    /// One bcrypt at a time.
    bcrypt_turn: tokio::sync::Mutex<()>,
}

impl BasicAuth {
    /// `users` maps a user name to its bcrypt hash (checked by `web_config`).
    pub fn new(users: BTreeMap<String, String>) -> Self {
        Self {
            users,
            accepted: Mutex::new(HashSet::new()),
            bcrypt_turn: tokio::sync::Mutex::new(()),
        }
    }

    pub fn users(&self) -> usize {
        self.users.len()
    }

    /// Whether `authorization` (the request's header) carries a user's right password.
    pub async fn allows(&self, authorization: Option<&HeaderValue>) -> bool {
        let Some((user, password)) = authorization.and_then(credentials) else {
            return false;
        };
        let key = digest(&user, &password);
        if self.accepted().contains(&key) {
            return true;
        }
        let (hash, known) = match self.users.get(&user) {
            Some(hash) => (hash.clone(), true),
            None => (UNKNOWN_USER_HASH.to_string(), false),
        };
        let matches = {
            let _turn = self.bcrypt_turn.lock().await;
            tokio::task::spawn_blocking(move || bcrypt::verify(password, &hash).unwrap_or(false))
                .await
                .unwrap_or(false)
        };
        let allowed = known && matches;
        if allowed {
            let mut accepted = self.accepted();
            if accepted.len() >= CACHE_MAX {
                accepted.clear();
            }
            accepted.insert(key);
        }
        allowed
    }

    fn accepted(&self) -> std::sync::MutexGuard<'_, HashSet<[u8; 32]>> {
        self.accepted.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The user and password of a `Basic` Authorization header.
fn credentials(header: &HeaderValue) -> Option<(String, String)> {
    let value = header.to_str().ok()?;
    let (scheme, encoded) = value.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let (user, password) = String::from_utf8(decoded)
        .ok()?
        .split_once(':')
        .map(|(u, p)| (u.to_string(), p.to_string()))?;
    Some((user, password))
}

fn digest(user: &str, password: &str) -> [u8; 32] {
    let mut context = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    // User names cannot contain ':' (web_config refuses them), so this is unambiguous.
    context.update(user.as_bytes());
    context.update(b":");
    context.update(password.as_bytes());
    context
        .finish()
        .as_ref()
        .try_into()
        .expect("SHA-256 is 32 bytes")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(user: &str, password: &str) -> HeaderValue {
        let encoded =
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
        HeaderValue::from_str(&format!("Basic {encoded}")).unwrap()
    }

    #[tokio::test]
    async fn the_right_password_passes_and_is_cached() {
        // Cost 4, the lowest: this tests the logic, not bcrypt.
        let hash = bcrypt::hash("s3cret", 4).unwrap();
        let auth = BasicAuth::new([("prometheus".to_string(), hash)].into());
        assert!(!auth.allows(None).await);
        assert!(!auth.allows(Some(&header("prometheus", "wrong"))).await);
        assert!(!auth.allows(Some(&header("nobody", "s3cret"))).await);
        assert!(auth.accepted().is_empty(), "refusals are not cached");
        assert!(auth.allows(Some(&header("prometheus", "s3cret"))).await);
        assert_eq!(auth.accepted().len(), 1);
        assert!(auth.allows(Some(&header("prometheus", "s3cret"))).await);
        assert_eq!(auth.accepted().len(), 1);
    }

    #[test]
    fn only_basic_credentials_are_read() {
        assert_eq!(
            credentials(&header("a", "b:c")),
            Some(("a".into(), "b:c".into()))
        );
        assert_eq!(credentials(&HeaderValue::from_static("Bearer abc")), None);
        assert_eq!(credentials(&HeaderValue::from_static("Basic !!!")), None);
    }
}
