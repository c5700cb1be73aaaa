//! A blocking HTTP/1.1 client for a leakscope daemon on loopback: enough for the API's
//! GETs, with timeouts so a wedged daemon fails a caller instead of hanging it.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use serde::de::DeserializeOwned;

use crate::openmetrics::{self, Sample};
use crate::types::{HeapResponse, TasksResponse, VerdictsResponse};

/// Why a request failed.
#[derive(Debug)]
pub enum ClientError {
    Io(std::io::Error),
    /// The daemon answered with another status than 200.
    Status {
        path: String,
        status: u16,
        body: String,
    },
    /// The body was not the JSON the path serves.
    Json {
        path: String,
        error: serde_json::Error,
    },
}

impl std::fmt::Display for ClientError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Io(e) => write!(f, "{e}"),
            Self::Status { path, status, body } => write!(f, "GET {path}: {status} {body}"),
            Self::Json { path, error } => write!(f, "GET {path}: not the expected JSON: {error}"),
        }
    }
}

impl std::error::Error for ClientError {}

impl From<std::io::Error> for ClientError {
    fn from(e: std::io::Error) -> Self {
        Self::Io(e)
    }
}

/// A daemon's API at `addr`.
#[derive(Debug, Clone, Copy)]
pub struct Client {
    pub addr: SocketAddr,
}

impl Client {
    pub fn new(addr: SocketAddr) -> Self {
        Self { addr }
    }

    /// Status and body of `GET path`.
    pub fn get(&self, path: &str) -> std::io::Result<(u16, String)> {
        get(self.addr, path)
    }

    /// The body of `GET path`, which must answer 200.
    pub fn get_ok(&self, path: &str) -> Result<String, ClientError> {
        match self.get(path)? {
            (200, body) => Ok(body),
            (status, body) => Err(ClientError::Status {
                path: path.to_string(),
                status,
                body,
            }),
        }
    }

    pub fn json<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        let body = self.get_ok(path)?;
        serde_json::from_str(&body).map_err(|error| ClientError::Json {
            path: path.to_string(),
            error,
        })
    }

    pub fn tasks(&self) -> Result<TasksResponse, ClientError> {
        self.json("/api/v1/tasks")
    }

    pub fn heap(&self) -> Result<HeapResponse, ClientError> {
        self.json("/api/v1/heap")
    }

    /// Leak suspects, highest score first.
    pub fn suspects(&self) -> Result<VerdictsResponse, ClientError> {
        self.json("/api/v1/suspects")
    }

    /// Every judged site with its verdict.
    pub fn sites(&self) -> Result<VerdictsResponse, ClientError> {
        self.json("/api/v1/sites")
    }

    pub fn metrics(&self) -> Result<Vec<Sample>, ClientError> {
        Ok(openmetrics::parse(&self.get_ok("/metrics")?))
    }
}

/// A plain HTTP/1.1 GET over loopback; returns status and body.
pub fn get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not an HTTP response: {response:?}")))?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}
