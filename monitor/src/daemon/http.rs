//! The daemon's HTTP server: `/metrics`, `/healthz` and the JSON API, every handler a
//! read of the ledgers through the export types; in front of them, the web config's
//! response headers, the body limit and basic auth. Connections are taken by `listener`.
//!
//! `/healthz` is open even when basic auth is on (exporter-toolkit protects every path):
//! a kubelet's httpGet probe cannot take its Authorization header from a Secret, so
//! protecting it would put the password in the pod spec, and it tells nothing but "ok".

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use log::{info, warn};
use thiserror::Error;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;

use super::basic_auth::BasicAuth;
use super::listener::{self, Limits};
use super::web_config::{ClientAuth, WebConfig};
use crate::export::Sources;
use crate::export::api::{self, HeapResponse, TasksResponse, VerdictsResponse};
use crate::export::prometheus;

#[derive(Debug, Error)]
#[error(
    "cannot listen on {addr}: {source} (another process may hold the port: choose another \
     with --listen)"
)]
pub struct ListenError {
    addr: SocketAddr,
    source: std::io::Error,
}

/// Paths served without basic auth (see the module's comment).
const OPEN_PATHS: [&str; 1] = ["/healthz"];

async fn metrics_handler(State(sources): State<Sources>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        prometheus::render(&sources),
    )
}

async fn tasks_handler(State(sources): State<Sources>) -> axum::Json<TasksResponse> {
    axum::Json(api::tasks(&sources))
}

async fn heap_handler(State(sources): State<Sources>) -> axum::Json<HeapResponse> {
    axum::Json(api::heap(&sources))
}

async fn suspects_handler(State(sources): State<Sources>) -> axum::Json<VerdictsResponse> {
    axum::Json(api::suspects(&sources))
}

async fn sites_handler(State(sources): State<Sources>) -> axum::Json<VerdictsResponse> {
    axum::Json(api::sites(&sources))
}

async fn require_auth(
    State(auth): State<Arc<BasicAuth>>,
    request: Request,
    next: Next,
) -> Response {
    if OPEN_PATHS.contains(&request.uri().path())
        || auth
            .allows(request.headers().get(header::AUTHORIZATION))
            .await
    {
        return next.run(request).await;
    }
    (
        StatusCode::UNAUTHORIZED,
        [(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Basic realm=\"leakscope\", charset=\"UTF-8\""),
        )],
        "Unauthorized\n",
    )
        .into_response()
}

/// 413 for a declared body over the limit. No handler reads a body, so one sent without
/// a length is never buffered; hyper closes the connection after the response instead.
async fn limit_body(State(max): State<u64>, request: Request, next: Next) -> Response {
    let length = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if length.is_some_and(|length| length > max) {
        let message = format!("request body over {max} bytes\n");
        return (StatusCode::PAYLOAD_TOO_LARGE, message).into_response();
    }
    next.run(request).await
}

async fn add_headers(
    State(headers): State<Arc<Vec<(header::HeaderName, HeaderValue)>>>,
    request: Request,
    next: Next,
) -> Response {
    let mut response = next.run(request).await;
    for (name, value) in headers.iter() {
        response.headers_mut().insert(name.clone(), value.clone());
    }
    response
}

/// The routes, behind the web config's layers. The last layer added runs first: headers
/// on every response, then the body limit, then auth (so an oversized request never costs
/// a bcrypt).
fn app(sources: Sources, web: Option<&WebConfig>, limits: &Limits) -> Router {
    let mut app = Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/api/v1/tasks", get(tasks_handler))
        .route("/api/v1/heap", get(heap_handler))
        .route("/api/v1/suspects", get(suspects_handler))
        .route("/api/v1/sites", get(sites_handler))
        .with_state(sources);
    if let Some(web) = web.filter(|w| !w.users.is_empty()) {
        let auth = Arc::new(BasicAuth::new(web.users.clone()));
        app = app.layer(middleware::from_fn_with_state(auth, require_auth));
    }
    app = app.layer(middleware::from_fn_with_state(
        limits.max_body_bytes,
        limit_body,
    ));
    if let Some(web) = web.filter(|w| !w.headers.is_empty()) {
        let headers = Arc::new(web.headers.clone());
        app = app.layer(middleware::from_fn_with_state(headers, add_headers));
    }
    app
}

/// What the startup line says about the listener's protection.
fn describe(web: Option<&WebConfig>) -> String {
    let Some(web) = web else {
        return "TLS off, basic auth off (no --web-config)".to_string();
    };
    let tls = match &web.tls {
        None => "TLS off".to_string(),
        Some(tls) => match tls.client_auth {
            ClientAuth::None => "TLS on".to_string(),
            ClientAuth::VerifyIfGiven => "TLS on, client certificates verified if given".into(),
            ClientAuth::RequireAndVerify => "TLS on, client certificates required".into(),
        },
    };
    let auth = match web.users.len() {
        0 => "basic auth off".to_string(),
        n => format!("basic auth on ({n} user(s); /healthz open)"),
    };
    format!("{tls}, {auth} (web config {})", web.path.display())
}

/// Binds `listen`: first, before anything is attached, so a port in use is said at once
/// and changes nothing.
pub async fn bind(listen: SocketAddr) -> Result<tokio::net::TcpListener, ListenError> {
    tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|source| ListenError {
            addr: listen,
            source,
        })
}

/// Serves the API from `sources` on `listener` (from [`bind`]), with the TLS and basic
/// auth of `web`, until the returned task is aborted.
pub fn serve(
    listener: tokio::net::TcpListener,
    web: Option<&WebConfig>,
    sources: Sources,
) -> JoinHandle<()> {
    let limits = Limits::default();
    let local = listener
        .local_addr()
        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
    let tls = web
        .and_then(|w| w.tls_config.clone())
        .map(TlsAcceptor::from);
    let scheme = if tls.is_some() { "https" } else { "http" };
    info!("serving /metrics on {scheme}://{local}: {}", describe(web));
    if !local.ip().is_loopback() {
        let (tls_on, auth_on) =
            web.map_or((false, false), |w| (w.tls.is_some(), !w.users.is_empty()));
        if !tls_on && !auth_on {
            warn!(
                "{local} is beyond loopback without TLS or basic auth: anyone who reaches it \
                 reads the watched processes' pids, names and sizes; protect it with \
                 --web-config (README, \"The listener\")"
            );
        } else if !tls_on {
            warn!(
                "{local} is beyond loopback with basic auth but without TLS: passwords cross \
                 the network readable; add tls_server_config to the web config"
            );
        }
    }
    let app = app(sources, web, &limits);
    tokio::spawn(listener::accept_loop(listener, tls, app, limits))
}
