//! A small client of the API socket (hyper's HTTP/1.1 client on a
//! current-thread tokio runtime), used by the `snapvm snapshot|vm|restore`
//! commands.

use std::path::{Path, PathBuf};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::{CONTENT_TYPE, HOST};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;

use super::model::Fault;

/// Why a call failed; one line each.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to {}: {source} (is `snapvm run --api-sock {}` running?)", .path.display(), .path.display())]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot start the client runtime: {0}")]
    Runtime(std::io::Error),
    #[error("cannot build the request: {0}")]
    Request(String),
    #[error("HTTP error talking to {}: {source}", .path.display())]
    Http { path: PathBuf, source: hyper::Error },
    /// The server answered with an error status.
    #[error("{message} (HTTP {status})")]
    Status { status: u16, message: String },
    #[error("unexpected reply: {0}")]
    Reply(String),
}

/// An answer: status and body text.
#[derive(Debug, Clone)]
pub struct ApiResponse {
    pub status: u16,
    pub body: String,
}

impl ApiResponse {
    /// The body as `T` when the status is 2xx, else the server's fault.
    pub fn ok_json<T: serde::de::DeserializeOwned>(&self) -> Result<T, ClientError> {
        self.check()?;
        serde_json::from_str(&self.body)
            .map_err(|e| ClientError::Reply(format!("{e}: {}", self.body)))
    }

    /// Ok for 2xx; the fault message otherwise.
    pub fn check(&self) -> Result<(), ClientError> {
        if (200..300).contains(&self.status) {
            return Ok(());
        }
        let message = serde_json::from_str::<Fault>(&self.body)
            .map(|f| f.fault_message)
            .unwrap_or_else(|_| self.body.trim().to_string());
        Err(ClientError::Status {
            status: self.status,
            message,
        })
    }
}

pub struct ApiClient {
    path: PathBuf,
    rt: tokio::runtime::Runtime,
}

impl ApiClient {
    pub fn new(path: &Path) -> Result<ApiClient, ClientError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(ClientError::Runtime)?;
        Ok(ApiClient {
            path: path.to_path_buf(),
            rt,
        })
    }

    /// One request on its own connection.
    pub fn call(
        &self,
        method: Method,
        uri: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<ApiResponse, ClientError> {
        let mut req = Request::builder()
            .method(method)
            .uri(uri)
            .header(HOST, "localhost");
        let body = match body {
            Some(v) => {
                req = req.header(CONTENT_TYPE, "application/json");
                Bytes::from(v.to_string())
            }
            None => Bytes::new(),
        };
        let req = req
            .body(Full::new(body))
            .map_err(|e| ClientError::Request(e.to_string()))?;
        let http = |source| ClientError::Http {
            path: self.path.clone(),
            source,
        };
        self.rt.block_on(async {
            let stream = tokio::net::UnixStream::connect(&self.path)
                .await
                .map_err(|source| ClientError::Connect {
                    path: self.path.clone(),
                    source,
                })?;
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .map_err(http)?;
            let driver = tokio::spawn(conn);
            let resp = sender.send_request(req).await.map_err(http)?;
            let status = resp.status().as_u16();
            let body = resp.into_body().collect().await.map_err(http)?.to_bytes();
            drop(sender);
            let _ = driver.await;
            Ok(ApiResponse {
                status,
                body: String::from_utf8_lossy(&body).into_owned(),
            })
        })
    }
}
