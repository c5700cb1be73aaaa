//! How the daemon takes connections: its own accept loop over hyper, because the bounds a
//! listener beyond loopback needs are not settings of `axum::serve`.
//!
//! - At most `max_connections` at once. Beyond, the loop stops accepting and new
//!   connections wait in the kernel's accept queue until one ends, rather than being
//!   refused: every connection's life is bounded by the timeouts below, so a wait is
//!   short, and a scrape or liveness probe that waits a moment beats one that fails.
//! - A TLS handshake must finish within `handshake_timeout`, and each request's headers
//!   (including the wait for the next request on a kept-alive connection) within
//!   `header_timeout`, so an idle or slow client cannot hold a slot.
//! - Request headers beyond `max_header_bytes` get 431 and the connection is closed
//!   (hyper); bodies beyond the limit get 413 (`http`).

use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use log::{debug, warn};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;

/// The listener's bounds.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Connections served at once; Prometheus keeps one per target, probes and `top` one
    /// each.
    pub max_connections: usize,
    /// The request line and headers (431 beyond).
    pub max_header_bytes: usize,
    /// A request body (413 beyond); no endpoint reads one.
    pub max_body_bytes: u64,
    pub handshake_timeout: Duration,
    pub header_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 64,
            max_header_bytes: 16 * 1024,
            max_body_bytes: 64 * 1024,
            handshake_timeout: Duration::from_secs(10),
            header_timeout: Duration::from_secs(10),
        }
    }
}

/// Accepts connections on `listener` for ever, each served by `app` (over TLS when `tls`).
pub async fn accept_loop(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    app: axum::Router,
    limits: Limits,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    loop {
        let slot = slots
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(err) => {
                // Out of file descriptors, or a connection reset before it was accepted:
                // the next accept may succeed, but not in a busy loop.
                warn!("accepting a connection: {err}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (tls, app) = (tls.clone(), app.clone());
        tokio::spawn(async move {
            let _slot = slot;
            match tls {
                None => serve_connection(stream, app, &limits).await,
                Some(acceptor) => {
                    match tokio::time::timeout(limits.handshake_timeout, acceptor.accept(stream))
                        .await
                    {
                        Ok(Ok(stream)) => serve_connection(stream, app, &limits).await,
                        // Debug, not warn: a TCP liveness probe fails a handshake every
                        // period.
                        Ok(Err(err)) => debug!("TLS handshake with {peer} failed: {err}"),
                        Err(_) => debug!("TLS handshake with {peer} timed out"),
                    }
                }
            }
        });
    }
}

async fn serve_connection<IO>(io: IO, app: axum::Router, limits: &Limits)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let result = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_header_size(limits.max_header_bytes)
        .serve_connection(TokioIo::new(io), TowerToHyperService::new(app))
        .await;
    if let Err(err) = result {
        debug!("connection ended: {err}");
    }
}
