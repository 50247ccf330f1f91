//! The API thread: HTTP/1.1 on the Unix socket (hyper on a current-thread
//! tokio runtime). It parses and routes requests and turns every problem
//! with a request into a JSON fault; it never touches the VM: each parsed
//! request becomes the owner's domain request (`rpc`) and goes over a
//! channel to the VM's owner thread, whose answer `rpc` turns into HTTP.

use std::convert::Infallible;
use std::os::unix::net::UnixListener as StdUnixListener;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Method, Request as HttpRequest, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::de::DeserializeOwned;
use tokio::sync::oneshot;

use super::model::{Action, Fault, ScheduleSet, SnapshotCreate, SnapshotLoad, VmPatch};
use super::rpc;
use super::socket::{self, SocketError};
use crate::owner::Envelope;

/// Largest request body read; larger ones get 413.
pub const MAX_BODY: usize = 64 * 1024;
/// Largest request head (request line + headers); hyper answers 431 past it.
const MAX_HEAD: usize = 64 * 1024;
/// A client that has not sent its whole head by then is dropped.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long in-flight responses may take to go out when the server stops.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

/// A parsed API request for the VM's owner.
#[derive(Debug, Clone, PartialEq)]
pub enum ApiRequest {
    Info,
    VmConfig,
    PatchVm(VmPatch),
    CreateSnapshot { body: SnapshotCreate, wait: bool },
    GetSnapshot(String),
    ListSnapshots,
    CancelSnapshot(String),
    LoadSnapshot(SnapshotLoad),
    SetSchedule(ScheduleSet),
    GetSchedule,
    StopSchedule,
    Action(Action),
    Metrics,
}

/// The owner's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub status: u16,
    pub body: ReplyBody,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplyBody {
    Empty,
    Json(String),
    /// Prometheus text exposition format.
    Metrics(String),
}

impl Reply {
    pub fn no_content() -> Reply {
        Reply {
            status: 204,
            body: ReplyBody::Empty,
        }
    }

    pub fn json<T: serde::Serialize>(status: u16, value: &T) -> Reply {
        match serde_json::to_string(value) {
            Ok(s) => Reply {
                status,
                body: ReplyBody::Json(s),
            },
            Err(e) => Reply::fault(500, format!("cannot encode the reply: {e}")),
        }
    }

    pub fn fault(status: u16, message: impl Into<String>) -> Reply {
        let fault = Fault {
            fault_message: message.into(),
        };
        // A struct of one string always serialises.
        let body = serde_json::to_string(&fault).unwrap_or_else(|_| "{}".into());
        Reply {
            status,
            body: ReplyBody::Json(body),
        }
    }
}

/// Why the API server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error(transparent)]
    Socket(#[from] SocketError),
    #[error("cannot start the API thread: {0}")]
    Spawn(std::io::Error),
}

/// The running API server. Dropping it stops the thread (letting answers
/// in flight go out) and removes the socket file.
pub struct ApiServer {
    path: PathBuf,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl ApiServer {
    /// Binds `path` (see [`socket::bind`]) and starts serving; requests
    /// go to the owner over `tx`.
    pub fn start(path: &Path, tx: mpsc::Sender<Envelope>) -> Result<ApiServer, ApiError> {
        let listener = socket::bind(path)?;
        let (stop_tx, stop_rx) = oneshot::channel();
        let shown = path.to_path_buf();
        let thread = std::thread::Builder::new()
            .name("api".into())
            .spawn(move || serve_thread(listener, tx, stop_rx, &shown));
        let thread = match thread {
            Ok(t) => t,
            Err(e) => {
                let _ = std::fs::remove_file(path);
                return Err(ApiError::Spawn(e));
            }
        };
        tracing::info!("API listening on {}", path.display());
        Ok(ApiServer {
            path: path.to_path_buf(),
            stop: Some(stop_tx),
            thread: Some(thread),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        if let Err(e) = std::fs::remove_file(&self.path) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!("cannot remove {}: {e}", self.path.display());
            }
        }
    }
}

fn serve_thread(
    listener: StdUnixListener,
    tx: mpsc::Sender<Envelope>,
    stop: oneshot::Receiver<()>,
    path: &Path,
) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!("API {}: cannot start the runtime: {e}", path.display());
            return;
        }
    };
    rt.block_on(async move {
        if let Err(e) = serve(listener, tx, stop).await {
            tracing::error!("API {}: {e}", path.display());
        }
    });
}

async fn serve(
    listener: StdUnixListener,
    tx: mpsc::Sender<Envelope>,
    mut stop: oneshot::Receiver<()>,
) -> std::io::Result<()> {
    listener.set_nonblocking(true)?;
    let listener = tokio::net::UnixListener::from_std(listener)?;
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let tx = tx.clone();
                    let service = hyper::service::service_fn(move |req| handle(req, tx.clone()));
                    let conn = hyper::server::conn::http1::Builder::new()
                        .timer(TokioTimer::new())
                        // Answer clients that shut down their write side
                        // after sending the request.
                        .half_close(true)
                        .header_read_timeout(HEADER_TIMEOUT)
                        .max_buf_size(MAX_HEAD)
                        .serve_connection(TokioIo::new(stream), service);
                    let conn = graceful.watch(conn);
                    tokio::spawn(async move {
                        if let Err(e) = conn.await {
                            tracing::debug!("API connection ended: {e}");
                        }
                    });
                }
                Err(e) => {
                    // E.g. out of file descriptors: back off, keep serving.
                    tracing::warn!("API accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = &mut stop => break,
        }
    }
    drop(listener);
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = tokio::time::sleep(DRAIN_TIMEOUT) => {
            tracing::debug!("API connections still open at shutdown were dropped");
        }
    }
    Ok(())
}

async fn handle(
    req: HttpRequest<Incoming>,
    tx: mpsc::Sender<Envelope>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let reply = match parse(req).await.and_then(rpc::to_request) {
        Ok((request, answer)) => ask_owner(request, answer, &tx).await,
        Err(fault) => fault,
    };
    Ok(to_response(reply))
}

async fn ask_owner(
    request: crate::owner::Request,
    answer: rpc::Answer,
    tx: &mpsc::Sender<Envelope>,
) -> Reply {
    let (reply, result) = oneshot::channel();
    let envelope = Envelope {
        request,
        reply: Some(reply),
    };
    if tx.send(envelope).is_err() {
        return Reply::fault(500, "snapvm is shutting down");
    }
    match result.await {
        Ok(result) => rpc::to_reply(answer, result),
        Err(_) => Reply::fault(500, "snapvm is shutting down"),
    }
}

fn to_response(reply: Reply) -> Response<Full<Bytes>> {
    let (ctype, body) = match reply.body {
        ReplyBody::Empty => (None, Bytes::new()),
        ReplyBody::Json(s) => (Some("application/json"), Bytes::from(s)),
        ReplyBody::Metrics(s) => (
            Some("text/plain; version=0.0.4; charset=utf-8"),
            Bytes::from(s),
        ),
    };
    let mut resp = Response::new(Full::new(body));
    *resp.status_mut() =
        StatusCode::from_u16(reply.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    if let Some(c) = ctype {
        resp.headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static(c));
    }
    resp
}

/// Routes a request and decodes its body; any problem is the fault reply.
async fn parse(req: HttpRequest<Incoming>) -> Result<ApiRequest, Reply> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let query = req.uri().query().map(str::to_string);
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let no_route = || Reply::fault(404, format!("no route for {method} {path}"));
    let route = match (&method, segments.as_slice()) {
        (&Method::GET, [""]) => Route::Plain(ApiRequest::Info),
        (&Method::GET, ["vm", "config"]) => Route::Plain(ApiRequest::VmConfig),
        (&Method::PATCH, ["vm"]) => Route::Body(BodyRoute::PatchVm),
        (&Method::PUT, ["snapshot", "create"]) => Route::Body(BodyRoute::Create),
        (&Method::PUT, ["snapshot", "load"]) => Route::Body(BodyRoute::Load),
        (&Method::PUT, ["snapshot", "schedule"]) => Route::Body(BodyRoute::Schedule),
        (&Method::GET, ["snapshot", "schedule"]) => Route::Plain(ApiRequest::GetSchedule),
        (&Method::DELETE, ["snapshot", "schedule"]) => Route::Plain(ApiRequest::StopSchedule),
        (_, ["snapshot", "create" | "load" | "schedule"]) => return Err(no_route()),
        (&Method::GET, ["snapshot", id]) if !id.is_empty() => {
            Route::Plain(ApiRequest::GetSnapshot((*id).to_string()))
        }
        (&Method::DELETE, ["snapshot", id]) if !id.is_empty() => {
            Route::Plain(ApiRequest::CancelSnapshot((*id).to_string()))
        }
        (&Method::GET, ["snapshots"]) => Route::Plain(ApiRequest::ListSnapshots),
        (&Method::PUT, ["actions"]) => Route::Body(BodyRoute::Action),
        (&Method::GET, ["metrics"]) => Route::Plain(ApiRequest::Metrics),
        _ => return Err(no_route()),
    };
    let wait = match (&route, query.as_deref()) {
        (Route::Body(BodyRoute::Create), Some(q)) => parse_wait(q)?,
        _ => false,
    };
    let kind = match route {
        Route::Plain(r) => return Ok(r),
        Route::Body(kind) => kind,
    };
    check_content_type(&req)?;
    let body = read_body(req).await?;
    Ok(match kind {
        BodyRoute::PatchVm => ApiRequest::PatchVm(decode(&body)?),
        BodyRoute::Create => ApiRequest::CreateSnapshot {
            body: decode(&body)?,
            wait,
        },
        BodyRoute::Load => ApiRequest::LoadSnapshot(decode(&body)?),
        BodyRoute::Schedule => ApiRequest::SetSchedule(decode(&body)?),
        BodyRoute::Action => ApiRequest::Action(decode(&body)?),
    })
}

enum Route {
    Plain(ApiRequest),
    Body(BodyRoute),
}

enum BodyRoute {
    PatchVm,
    Create,
    Load,
    Schedule,
    Action,
}

/// `?wait=true|false`; anything else is a 400.
fn parse_wait(query: &str) -> Result<bool, Reply> {
    let mut wait = false;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("wait", "true")) => wait = true,
            Some(("wait", "false")) => wait = false,
            Some(("wait", v)) => {
                return Err(Reply::fault(
                    400,
                    format!("invalid value '{v}' for wait: expected true or false"),
                ))
            }
            _ => {
                return Err(Reply::fault(
                    400,
                    format!("unknown query parameter '{pair}': expected wait=true|false"),
                ))
            }
        }
    }
    Ok(wait)
}

/// Bodies are JSON: a Content-Type, if given, must say so.
fn check_content_type(req: &HttpRequest<Incoming>) -> Result<(), Reply> {
    let Some(value) = req.headers().get(CONTENT_TYPE) else {
        return Ok(());
    };
    let ok = value
        .to_str()
        .ok()
        .and_then(|v| v.split(';').next())
        .is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json"));
    if ok {
        Ok(())
    } else {
        Err(Reply::fault(
            400,
            format!(
                "unsupported Content-Type '{}': expected application/json",
                String::from_utf8_lossy(value.as_bytes())
            ),
        ))
    }
}

async fn read_body(req: HttpRequest<Incoming>) -> Result<Bytes, Reply> {
    match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(Reply::fault(
            413,
            format!("request body larger than {MAX_BODY} bytes"),
        )),
        Err(e) => Err(Reply::fault(
            400,
            format!("cannot read the request body: {e}"),
        )),
    }
}

fn decode<T: DeserializeOwned>(body: &[u8]) -> Result<T, Reply> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(Reply::fault(400, "missing JSON body"));
    }
    serde_json::from_slice(body).map_err(|e| Reply::fault(400, format!("invalid JSON body: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wait_query() {
        assert_eq!(parse_wait("wait=true"), Ok(true));
        assert_eq!(parse_wait("wait=false"), Ok(false));
        assert_eq!(parse_wait(""), Ok(false));
        assert_eq!(parse_wait("wait=yes").unwrap_err().status, 400);
        assert_eq!(parse_wait("x=1").unwrap_err().status, 400);
    }

    #[test]
    fn decode_errors_are_400() {
        let e = decode::<VmPatch>(b"").unwrap_err();
        assert_eq!(e, Reply::fault(400, "missing JSON body"),);
        let e = decode::<VmPatch>(b"{\"state\":").unwrap_err();
        assert_eq!(e.status, 400);
    }
}
