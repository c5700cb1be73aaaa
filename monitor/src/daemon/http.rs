//! The daemon's HTTP server: `/metrics`, `/healthz` and the JSON API, every handler a
//! read of the ledgers through the export types.

use std::net::SocketAddr;

use anyhow::Context as _;
use axum::Router;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use log::info;
use tokio::task::JoinHandle;

use crate::export::Sources;
use crate::export::api::{self, HeapResponse, TasksResponse, VerdictsResponse};
use crate::export::prometheus;

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

/// Binds `listen` and serves the API from `sources` until the returned task is aborted.
pub async fn serve(
    listen: SocketAddr,
    sources: Sources,
) -> anyhow::Result<JoinHandle<std::io::Result<()>>> {
    let app = Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/api/v1/tasks", get(tasks_handler))
        .route("/api/v1/heap", get(heap_handler))
        .route("/api/v1/suspects", get(suspects_handler))
        .route("/api/v1/sites", get(sites_handler))
        .with_state(sources);
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("listening on {listen}"))?;
    info!("serving /metrics on http://{}", listener.local_addr()?);
    Ok(tokio::spawn(
        async move { axum::serve(listener, app).await },
    ))
}
